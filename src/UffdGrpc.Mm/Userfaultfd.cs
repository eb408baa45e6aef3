namespace UffdGrpc.Mm;

/// <summary>struct uffd_msg: a page fault or a non-cooperative event.</summary>
public sealed record UffdMsg
{
    public UffdEvent Event { get; init; }
    public PagefaultFlags Flags { get; init; }
    /// <summary>Page-fault address (page-masked unless EXACT_ADDRESS).</summary>
    public ulong Address { get; init; }
    /// <summary>ptid (THREAD_ID), else 0.</summary>
    public uint Ptid { get; init; }
    /// <summary>The faulting address itself, used by WAKE range matching.</summary>
    public ulong RealAddress { get; init; }
    /// <summary>FORK: the child's new context (its fd is created when the message is read).</summary>
    public UserfaultfdCtx? ForkCtx { get; init; }
    /// <summary>REMAP: from, to, len. REMOVE/UNMAP: start (From) and end (To).</summary>
    public ulong From { get; init; }
    public ulong To { get; init; }
    public ulong Len { get; init; }

    public static UffdMsg Pagefault(PagefaultFlags flags, ulong address, uint ptid, ulong real) =>
        new() { Event = UffdEvent.Pagefault, Flags = flags, Address = address, Ptid = ptid, RealAddress = real };

    /// <summary>The 32-byte little-endian uffd_msg as read(2) returns it.</summary>
    public byte[] ToBytes()
    {
        var b = new byte[32];
        b[0] = (byte)Event;
        void Put64(int off, ulong v) => BitConverter.TryWriteBytes(b.AsSpan(off, 8), v);
        switch (Event)
        {
            case UffdEvent.Pagefault:
                Put64(8, (ulong)Flags);
                Put64(16, Address);
                BitConverter.TryWriteBytes(b.AsSpan(24, 4), Ptid);
                break;
            case UffdEvent.Fork:
                BitConverter.TryWriteBytes(b.AsSpan(8, 4), (uint)(ForkCtx?.Id ?? 0));
                break;
            case UffdEvent.Remap:
                Put64(8, From);
                Put64(16, To);
                Put64(24, Len);
                break;
            default:
                Put64(8, From);
                Put64(16, To);
                break;
        }
        return b;
    }
}

/// <summary>A thread sleeping on a context: in handle_userfault or waiting for an event to be read.</summary>
internal sealed class UffdWaiter(SimThread thread, UffdMsg msg, AccessOrigin origin = AccessOrigin.User)
{
    /// <summary>When the message was queued (<see cref="Kernel.Clock"/> ticks; observation only).</summary>
    public long RaisedAt { get; } = thread.Kernel.Now;
    public SimThread Thread { get; } = thread;
    public UffdMsg Msg { get; } = msg;
    /// <summary>The page of the faulting address (a wake compares it against its range for every sleeper, so it is kept here rather than read through the message).</summary>
    public ulong PageAddress { get; } = msg.RealAddress & ~(Kernel.PageSize - 1);
    /// <summary>A page fault's origin: a user access sleeps TASK_INTERRUPTIBLE and restarts after a signal.</summary>
    public AccessOrigin Origin { get; } = origin;
    /// <summary>The event was read (event waiters) or the waiter was woken.</summary>
    public bool Done { get; set; }
    /// <summary>When a handler read the message (0 until then; observation only).</summary>
    public long ReadAt { get; set; }
    /// <summary>The errno of the last fill that failed on this page while the waiter slept (EEXIST, EAGAIN, ESRCH; observation only).</summary>
    public Errno FillErrno { get; set; }
}

/// <summary>The state of a userfaultfd context (UFFD_STATE_*).</summary>
public enum UffdState
{
    WaitApi,
    Running,
}

/// <summary>Result of a fill ioctl: the errno and the result field (null: not written).</summary>
public readonly record struct FillResult(Errno Errno, long? Field)
{
    public static FillResult Untouched(Errno e) => new(e, null);
}

/// <summary>
/// A userfaultfd context (struct userfaultfd_ctx) and its ioctl front end
/// (fs/userfaultfd.c). The memory operations live in <see cref="Mm"/> (mm/userfaultfd.c).
/// </summary>
/// <remarks>Protected by <see cref="Kernel.Lock"/>.</remarks>
public sealed partial class UserfaultfdCtx
{
    private readonly List<UffdWaiter> _faultPending = [];
    private readonly List<UffdWaiter> _faultWaiting = [];
    private readonly List<UffdWaiter> _events = [];

    internal UserfaultfdCtx(Mm mm, int id, bool nonBlocking, bool userModeOnly)
    {
        Mm = mm;
        Kernel = mm.Kernel;
        Id = id;
        NonBlocking = nonBlocking;
        UserModeOnly = userModeOnly;
    }

    public Kernel Kernel { get; }
    /// <summary>The address space the context belongs to (ctx->mm).</summary>
    public Mm Mm { get; }
    public int Id { get; }
    public UffdState State { get; internal set; }
    /// <summary>The enabled features: the requested set plus implicit bits (WP_ASYNC → WP_UNPOPULATED).</summary>
    public UffdFeatures Features { get; internal set; }
    public bool NonBlocking { get; }
    public bool UserModeOnly { get; }
    /// <summary>ctx->released: the last file reference is gone.</summary>
    public bool Released { get; private set; }
    /// <summary>ctx->mmap_changing: non-cooperative events prepared but not yet read.</summary>
    public int MmapChanging { get; internal set; }

    /// <summary>
    /// The sleepers on ctx->fd_wqh (read, poll, a handler's stream): called under the machine
    /// lock whenever a message is queued or the context is released, as handle_userfault,
    /// userfaultfd_event_wait_completion and userfaultfd_release call
    /// <c>wake_up_poll(&amp;ctx->fd_wqh, ...)</c>. It must not block.
    /// </summary>
    public Action? FdWqhWake { get; set; }

    public bool WpAsync => (Features & UffdFeatures.WpAsync) != 0;
    public bool WpUnpopulated => (Features & UffdFeatures.WpUnpopulated) != 0;

    /// <summary>Unread page faults plus unread events.</summary>
    public int UnreadCount => _faultPending.Count + _events.Count(e => !e.Done);
    /// <summary>Threads sleeping in a userfault on this context (read or not).</summary>
    public int BlockedFaults => _faultPending.Count + _faultWaiting.Count;

    /// <summary>The kernel's available feature set for the profile (UFFD_API_FEATURES).</summary>
    public static UffdFeatures AvailableFeatures(KernelProfile profile) => Kernel.ApiFeatures(profile);

    // ------------------------------------------------------------------ waiters

    internal void QueueFault(SimThread t, UffdMsg msg, AccessOrigin origin)
    {
        var w = new UffdWaiter(t, msg, origin);
        _faultPending.Add(w);
        t.Park(this, w, ThreadState.BlockedInUserfault);
        Kernel.OnUserfaultRaised(w);
        Mm.Kernel.OnUserfaultSleep(t, w);
        Kernel.BlocktimeBegin(t);
        FdWqhWake?.Invoke();
    }

    /// <summary>Queues a non-cooperative event; <paramref name="t"/> sleeps until it is read.</summary>
    internal void QueueEvent(SimThread t, UffdMsg msg)
    {
        var w = new UffdWaiter(t, msg);
        _events.Add(w);
        t.Park(this, w, ThreadState.BlockedOnEvent);
        FdWqhWake?.Invoke();
    }

    /// <summary>
    /// Models wake_userfault / __wake_userfault: wakes every blocked page fault (read or
    /// unread) whose address lies in [start, start+len); its message leaves the queue.
    /// </summary>
    internal void WakeUserfault(ulong start, ulong len, UserfaultOutcome by)
    {
        Wake(_faultPending, start, len, by);
        Wake(_faultWaiting, start, len, by);
    }

    private void Wake(List<UffdWaiter> list, ulong start, ulong len, UserfaultOutcome by)
    {
        for (var i = 0; i < list.Count; i++)
        {
            var w = list[i];
            var a = w.PageAddress;
            if (a < start || a - start >= len)
                continue;
            list.RemoveAt(i--);
            w.Done = true;
            Kernel.OnUserfaultEnded(w, by);
            w.Thread.Unpark();
        }
    }

    /// <summary>
    /// A signal ends <paramref name="t"/>'s sleep in handle_userfault (TASK_INTERRUPTIBLE):
    /// its waiter leaves the queue, read or not (list_del of uwq.wq.entry), and the fault
    /// returns VM_FAULT_RETRY; the thread retries when the current operation ends.
    /// </summary>
    internal void InterruptWaiter(SimThread t)
    {
        EndWaitersOf(t, UserfaultOutcome.Signal);
        t.Unpark();
    }

    /// <summary>Removes <paramref name="t"/>'s page-fault waiters, read or not, reporting how they ended.</summary>
    private void EndWaitersOf(SimThread t, UserfaultOutcome outcome)
    {
        foreach (var list in (ReadOnlySpan<List<UffdWaiter>>)[_faultPending, _faultWaiting])
        {
            for (var i = 0; i < list.Count; i++)
            {
                if (list[i].Thread != t)
                    continue;
                Kernel.OnUserfaultEnded(list[i], outcome);
                list.RemoveAt(i--);
            }
        }
    }

    /// <summary>The threads asleep in a userfault on this context and their fault origin, oldest first.</summary>
    internal IEnumerable<UffdWaiter> FaultWaiters => _faultWaiting.Concat(_faultPending);

    /// <summary>Drops the waiters of a thread that is killed or exits.</summary>
    internal void ForgetThread(SimThread t)
    {
        EndWaitersOf(t, UserfaultOutcome.Exit);
        foreach (var w in _events.Where(w => w.Thread == t && !w.Done).ToList())
        {
            _events.Remove(w);
            MmapChanging--;
        }
    }

    // ------------------------------------------------------------------ read / poll

    /// <summary>Models userfaultfd_poll: POLLERR before API or on a blocking uffd, else POLLIN when something is unread.</summary>
    public (bool PollIn, bool PollErr) Poll()
    {
        using var _ = Kernel.Enter();
        if (State == UffdState.WaitApi || !NonBlocking)
            return (false, true);
        return (UnreadCount > 0, false);
    }

    /// <summary>
    /// Models userfaultfd_ctx_read for one message: the oldest unread page fault first,
    /// else the oldest event. Reading a fault moves it to the read-but-waiting set (the
    /// thread keeps sleeping). Reading an event completes it: the thread that raised it
    /// resumes and mmap_changing drops. Errno EAGAIN when nothing is queued, EINVAL
    /// before UFFDIO_API.
    /// </summary>
    public Errno Read(out UffdMsg? msg)
    {
        using var _ = Kernel.Enter();
        msg = null;
        if (State == UffdState.WaitApi)
            return Errno.EINVAL;
        if (_faultPending.Count > 0 && (_events.Count == 0 || Kernel.Inject(InjectSite.ReadEventFirst, Mm, this, null, _faultPending[0].Msg.RealAddress) is null))
        {
            var w = _faultPending[0];
            _faultPending.RemoveAt(0);
            w.ReadAt = Kernel.Now;
            _faultWaiting.Add(w);
            msg = w.Msg;
            Kernel.SignalAfterRead(this, w);
            return Errno.OK;
        }
        if (_events.Count > 0)
        {
            var w = _events[0];
            _events.RemoveAt(0);
            msg = w.Msg;
            if (msg.ForkCtx is { } child)
                child.Installed = true;
            CompleteEvent(w);
            return Errno.OK;
        }
        return Errno.EAGAIN;
    }

    /// <summary>userfaultfd_event_complete + the waiter's atomic_dec(&amp;mmap_changing).</summary>
    private void CompleteEvent(UffdWaiter w)
    {
        w.Done = true;
        MmapChanging--;
        w.Thread.Unpark();
    }

    /// <summary>A FORK child context whose fd was created by reading the FORK event.</summary>
    public bool Installed { get; internal set; } = true;

    /// <summary>
    /// Models userfaultfd_release (close of the last reference): the context is released,
    /// every VMA registered on it is unregistered (6.x: uffd-wp reset as by UNREGISTER),
    /// and every blocked fault and event waiter is woken.
    /// </summary>
    public void Release()
    {
        using var _ = Kernel.Enter();
        if (Released)
            return;
        Released = true;
        if (!Mm.Exited)
            Mm.UserfaultfdReleaseAll(this);
        foreach (var w in _faultPending.Concat(_faultWaiting).ToList())
        {
            w.Done = true;
            Kernel.OnUserfaultEnded(w, UserfaultOutcome.Close);
            w.Thread.Unpark();
        }
        _faultPending.Clear();
        _faultWaiting.Clear();
        foreach (var w in _events.ToList())
        {
            if (w.Msg.ForkCtx is { } child && !child.Installed)
                child.Release();
            CompleteEvent(w);
        }
        _events.Clear();
        FdWqhWake?.Invoke();
    }
}

/// <summary>Predicates combining a VMA and an entry (include/linux/userfaultfd_k.h).</summary>
public static class Userfaultfd
{
    /// <summary>userfaultfd_pte_wp: the VMA is WP-registered and the PTE carries uffd-wp.</summary>
    public static bool PteWp(Vma vma, Pte pte) => vma.UserfaultfdWp && pte.UffdWp;

    /// <summary>userfaultfd_huge_pmd_wp.</summary>
    public static bool HugePmdWp(Vma vma, Pmd pmd) => vma.UserfaultfdWp && pmd.UffdWp;
}
