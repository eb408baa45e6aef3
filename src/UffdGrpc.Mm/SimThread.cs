using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>What a simulated thread is doing.</summary>
public enum ThreadState
{
    /// <summary>No operation, or running one.</summary>
    Running,
    /// <summary>Asleep in handle_userfault.</summary>
    BlockedInUserfault,
    /// <summary>Asleep until a non-cooperative event it raised is read.</summary>
    BlockedOnEvent,
    /// <summary>The thread's process exited or was killed.</summary>
    Exited,
}

/// <summary>
/// A simulated thread (task_struct). It runs one <see cref="SyscallOp"/> at a time; an
/// operation that must wait parks and is retried from the top when woken.
/// </summary>
/// <remarks>Protected by <see cref="Kernel.Lock"/>.</remarks>
public sealed partial class SimThread
{
    internal SimThread(Kernel kernel, Mm mm, int tid)
    {
        Kernel = kernel;
        Mm = mm;
        Tid = tid;
    }

    public Kernel Kernel { get; }
    public Mm Mm { get; internal set; }
    public int Tid { get; }
    public ThreadState State { get; private set; }
    /// <summary>The operation in progress, if any.</summary>
    public SyscallOp? Op { get; internal set; }
    /// <summary>The context the thread sleeps on, while blocked.</summary>
    public UserfaultfdCtx? BlockedOn { get; private set; }
    internal bool Queued;
    /// <summary>The thread is in its process's <see cref="Mm.Threads"/> (created by <see cref="Kernel.CreateThread(Mm)"/>; populate's transient fault context is not), so it counts in <see cref="Mm.LiveThreads"/>.</summary>
    internal bool Listed;
    private UffdWaiter? _waiter;

    public bool IsBlocked => State is ThreadState.BlockedInUserfault or ThreadState.BlockedOnEvent;

    internal void Park(UserfaultfdCtx ctx, UffdWaiter w, ThreadState state)
    {
        Debug.Assert(Op is not null);
        BlockedOn = ctx;
        _waiter = w;
        State = state;
    }

    /// <summary>Wakes the thread; its operation retries when the waker's operation ends.</summary>
    internal void Unpark()
    {
        if (!IsBlocked)
            return;
        State = ThreadState.Running;
        BlockedOn = null;
        _waiter = null;
        Kernel.MakeRunnable(this);
    }

    /// <summary>
    /// Runs the operation until it completes or parks. If the thread is killed meanwhile
    /// (the OOM killer chose its process during an allocation of this very operation), the
    /// operation has already been aborted and what its step returned is dropped.
    /// </summary>
    internal void RunOp()
    {
        if (Op is not { } op || IsBlocked || State == ThreadState.Exited)
            return;
        if (op.Step() && Op == op && State != ThreadState.Exited)
        {
            Op = null;
            op.Finish();
        }
    }

    /// <summary>The thread dies (SIGKILL or process exit): its sleep ends and its operation is dropped.</summary>
    internal void Exit()
    {
        BlockedOn?.ForgetThread(this);
        BlockedOn = null;
        _waiter = null;
        var op = Op;
        Op = null;
        if (State != ThreadState.Exited && Listed)
            Mm.LiveThreads--;
        State = ThreadState.Exited;
        Kernel.BlocktimeThreadsChanged(Mm);
        Group?.ThreadExited();
        op?.Abort();
    }

    public override string ToString() => $"tid {Tid} ({State})";
}

/// <summary>
/// A system call or access in progress on a <see cref="SimThread"/>. <see cref="Step"/>
/// runs until the call completes (true) or the thread parks (false); a woken thread calls
/// it again, which retries from the last completed step, like a restarted fault.
/// </summary>
public abstract class SyscallOp
{
    public SimThread Thread { get; internal set; } = null!;
    public bool IsCompleted { get; private set; }
    /// <summary>
    /// The call's errno (the syscall's return; EFAULT for a failed kernel-origin access; OK
    /// for a user access, whose failure is a <see cref="AccessOp.Signal"/>).
    /// </summary>
    public Errno Result { get; protected internal set; }
    /// <summary>The thread died before the call completed.</summary>
    public bool Aborted { get; private set; }
    /// <summary>Called under the machine lock when the operation completes or is aborted; must not block.</summary>
    public Action<SyscallOp>? Completed { get; set; }

    protected Mm Mm => Thread.Mm;

    protected internal abstract bool Step();

    internal void Finish()
    {
        IsCompleted = true;
        Completed?.Invoke(this);
    }

    /// <summary>Releases what the call holds (pins) when its thread dies; runs under the machine lock.</summary>
    protected internal virtual void OnAbort()
    {
    }

    internal void Abort()
    {
        OnAbort();
        Aborted = true;
        IsCompleted = true;
        Completed?.Invoke(this);
    }
}
