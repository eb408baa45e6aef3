using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>Why a thread sleeps in handle_userfault: the VM_UFFD_* reason of its page fault.</summary>
public enum UserfaultClass
{
    /// <summary>VM_UFFD_MISSING: no page (a none PTE, a uffd-wp marker's none page, a swap-less miss).</summary>
    Missing,
    /// <summary>VM_UFFD_WP: a write to a uffd-wp protected page (UFFD_PAGEFAULT_FLAG_WP).</summary>
    Wp,
    /// <summary>VM_UFFD_MINOR: the page is in the page cache but not mapped (UFFD_PAGEFAULT_FLAG_MINOR).</summary>
    Minor,
}

/// <summary>What ended a thread's sleep in handle_userfault.</summary>
public enum UserfaultOutcome
{
    /// <summary>UFFDIO_COPY woke it (or another handler's identical fill of the page).</summary>
    Copy,
    /// <summary>UFFDIO_ZEROPAGE woke it.</summary>
    Zeropage,
    /// <summary>UFFDIO_CONTINUE woke it.</summary>
    Continue,
    /// <summary>UFFDIO_POISON woke it.</summary>
    Poison,
    /// <summary>UFFDIO_MOVE woke it.</summary>
    Move,
    /// <summary>UFFDIO_WRITEPROTECT without WP or DONTWAKE (un-protect and wake) woke it.</summary>
    Writeprotect,
    /// <summary>UFFDIO_WAKE woke it.</summary>
    Wake,
    /// <summary>UFFDIO_UNREGISTER of a MISSING registration woke it.</summary>
    Unregister,
    /// <summary>The userfaultfd was released (userfaultfd_release): the fault retries unhandled.</summary>
    Close,
    /// <summary>A signal ended the interruptible sleep (VM_FAULT_RETRY).</summary>
    Signal,
    /// <summary>The thread was killed or exited while asleep.</summary>
    Exit,
    /// <summary>A fill of its page failed with EEXIST (another fill placed it, which woke nothing), and a later WAKE or un-protect woke it.</summary>
    Eexist,
    /// <summary>A fill of its page failed with EAGAIN (mmap_changing, or a partial fill stopped before it), and a later WAKE or un-protect woke it.</summary>
    Eagain,
    /// <summary>A fill of its page failed with ESRCH (the process was exiting), and the thread died asleep.</summary>
    Esrch,
}

/// <summary>
/// One userfault from the moment its message was queued to the moment the sleep ended,
/// with <see cref="Stopwatch"/> timestamps (<see cref="ReadAt"/> is 0 when no handler read
/// the message first; <see cref="ResolvedAt"/> is when the call that ended the sleep was
/// received, see <see cref="Kernel.CallReceivedAt"/>).
/// </summary>
public readonly record struct UserfaultEnd(UserfaultClass Class, UserfaultOutcome Outcome, AccessOrigin Origin, long RaisedAt, long ReadAt, long EndedAt, long ResolvedAt = 0)
{
    /// <summary>From the message being read to the resolving call being received (null when it was never read).</summary>
    public TimeSpan? Handling => ReadAt == 0 || ResolvedAt == 0 ? null : Stopwatch.GetElapsedTime(ReadAt, ResolvedAt);

    /// <summary>From the resolving call being received to the end of the sleep.</summary>
    public TimeSpan Waking => ResolvedAt == 0 ? TimeSpan.Zero : Stopwatch.GetElapsedTime(ResolvedAt, EndedAt);

    /// <summary>From the fault being raised to the end of the sleep.</summary>
    public TimeSpan Total => Stopwatch.GetElapsedTime(RaisedAt, EndedAt);

    /// <summary>From the fault being raised to its message being read by a handler (null when it was never read).</summary>
    public TimeSpan? Queued => ReadAt == 0 ? null : Stopwatch.GetElapsedTime(RaisedAt, ReadAt);

    /// <summary>From the message being read to the end of the sleep (null when it was never read).</summary>
    public TimeSpan? Handled => ReadAt == 0 ? null : Stopwatch.GetElapsedTime(ReadAt, EndedAt);
}

/// <summary>Observation hooks for operators (metrics): plain events, no state the model depends on.</summary>
public sealed partial class Kernel
{
    /// <summary>
    /// Raised when a page fault's message is queued on a userfaultfd (handle_userfault), under
    /// the machine lock: a handler must only record (no blocking, no call into the model).
    /// </summary>
    public event Action<UserfaultClass>? UserfaultRaised;

    /// <summary>
    /// Raised when a thread's sleep in handle_userfault ends, under the machine lock: a
    /// handler must only record (no blocking, no call into the model).
    /// </summary>
    public event Action<UserfaultEnd>? UserfaultEnded;

    internal static UserfaultClass ClassOf(UffdMsg msg) =>
        (msg.Flags & PagefaultFlags.Wp) != 0 ? UserfaultClass.Wp
        : (msg.Flags & PagefaultFlags.Minor) != 0 ? UserfaultClass.Minor
        : UserfaultClass.Missing;

    internal void OnUserfaultRaised(UffdWaiter w)
    {
        Migration.FaultsRaised++;
        w.Thread.Mm.Migration.FaultsRaised++;
        UserfaultRaised?.Invoke(ClassOf(w.Msg));
    }

    internal void OnUserfaultEnded(UffdWaiter w, UserfaultOutcome outcome)
    {
        BlocktimeEnd(w.Thread);
        var ended = Now;
        var c = ClassOf(w.Msg);
        outcome = MetricOutcome(w, outcome);
        var resolved = ResolvedAt(w, ended);
        RecordUserfault(w, c, outcome, ended, resolved);
        UserfaultEnded?.Invoke(new UserfaultEnd(c, outcome, w.Origin, w.RaisedAt, w.ReadAt, ended, resolved));
    }
}
