using System.Diagnostics;
using System.Numerics;
using System.Runtime.InteropServices;

namespace UffdGrpc.Mm;

/// <summary>The phases of a userfault's resolution, as the migration metrics split it.</summary>
public enum FaultPhase
{
    /// <summary>Raised (message queued by handle_userfault) → read by a handler (userfaultfd_ctx_read).</summary>
    Queued,
    /// <summary>Read → the resolving call received (the ioctl that woke the waiter, as the host stamps its arrival).</summary>
    Handling,
    /// <summary>Resolving call received → the waiter woken (wake_userfault): its access resumes.</summary>
    Waking,
    /// <summary>Raised → woken, for every fault (read or not).</summary>
    Total,
}

/// <summary>One latency distribution: counts per 2^N µs bucket, the number of samples and their sum.</summary>
public sealed record LatencyDistribution(UserfaultClass Class, UserfaultOutcome Outcome, FaultPhase Phase, long[] Counts, long Count, double SumMicros);

/// <summary>
/// The migration figures of a process or a machine: fault-resolution latency histograms with
/// 2^N microsecond buckets (QEMU 10.1's postcopy-latency-dist: bucket N holds
/// [2^N, 2^(N+1)) µs; 33 buckets, the last open-ended) by class × outcome × phase, and the
/// counters of what the resolving calls did. An observation only: nothing in the model
/// depends on it. Protected by <see cref="Kernel.Lock"/>.
/// </summary>
public sealed class MigrationStats
{
    /// <summary>Buckets per histogram, as QEMU's BLOCKTIME_LATENCY_BUCKET_N.</summary>
    public const int Buckets = 33;

    private readonly Dictionary<int, (long[] Counts, double Sum)> _histograms = [];

    /// <summary>Pages placed by successful fills (partial fills included).</summary>
    public long PagesMoved { get; internal set; }
    /// <summary>Bytes carried by COPY and MOVE.</summary>
    public long BytesMoved { get; internal set; }
    /// <summary>Resolving calls: fills, WAKE and WRITEPROTECT without WP (un-protect), whatever they returned.</summary>
    public long RoundTrips { get; internal set; }
    public long FaultsRaised { get; internal set; }
    public long FaultsEnded { get; internal set; }
    public long FillsEexist { get; internal set; }
    public long FillsEagain { get; internal set; }
    public long FillsEsrch { get; internal set; }

    /// <summary>The bucket of a latency: floor(log2(µs)), 0 under 2 µs, the last from 2^32 µs on.</summary>
    public static int BucketOf(double micros) =>
        micros < 2 ? 0 : Math.Min(Buckets - 1, BitOperations.Log2((ulong)Math.Min(micros, ulong.MaxValue / 2.0)));

    internal void Record(UserfaultClass c, UserfaultOutcome o, FaultPhase p, long ticks)
    {
        var micros = Math.Max(0, ticks) * 1e6 / Stopwatch.Frequency;
        var key = (((int)c * 64) + (int)o) * 8 + (int)p;
        // One lookup: the entry is updated in place (nothing is added or removed meanwhile).
        ref var h = ref CollectionsMarshal.GetValueRefOrAddDefault(_histograms, key, out var exists);
        if (!exists)
            h = (new long[Buckets], 0);
        h.Counts[BucketOf(micros)]++;
        h.Sum += micros;
    }

    /// <summary>The non-empty distributions ordered by class, outcome and phase (copies). Caller holds the kernel lock.</summary>
    public IReadOnlyList<LatencyDistribution> Distributions() =>
        [.. _histograms.OrderBy(kv => kv.Key).Select(kv => new LatencyDistribution(
            (UserfaultClass)(kv.Key / 8 / 64), (UserfaultOutcome)(kv.Key / 8 % 64), (FaultPhase)(kv.Key % 8),
            (long[])kv.Value.Counts.Clone(), kv.Value.Counts.Sum(), kv.Value.Sum))];
}

/// <summary>The migration metrics' stamps and counters (observation hooks of the uffd paths).</summary>
public sealed partial class Kernel
{
    /// <summary>
    /// When the call now running arrived at the host (<see cref="Stopwatch"/> ticks; 0: the
    /// model call itself is the arrival). A host sets it under the lock for the duration of
    /// each call, so the handling and waking phases split at the moment the resolving call
    /// was received rather than at the moment it got the lock.
    /// </summary>
    public long CallReceivedAt { get; set; }

    /// <summary>The machine's metrics (every process it has had).</summary>
    public MigrationStats Migration { get; } = new();

    /// <summary>The write sequence: the number of the last guest workload write that landed on the machine.</summary>
    public ulong WriteSeq { get; private set; }

    internal ulong NextWriteSeq() => ++WriteSeq;

    /// <summary>
    /// When the call that ends <paramref name="w"/>'s sleep at <paramref name="ended"/> was
    /// received: <see cref="CallReceivedAt"/> (or the end itself), no earlier than the read
    /// (a call that arrived first waited for the lock while the message was read) or the raise.
    /// </summary>
    private long ResolvedAt(UffdWaiter w, long ended) =>
        Math.Clamp(CallReceivedAt != 0 ? CallReceivedAt : ended, w.ReadAt != 0 ? w.ReadAt : w.RaisedAt, ended);

    private void RecordUserfault(UffdWaiter w, UserfaultClass c, UserfaultOutcome o, long ended, long resolved)
    {
        var read = w.ReadAt;
        foreach (var s in (ReadOnlySpan<MigrationStats>)[Migration, w.Thread.Mm.Migration])
        {
            s.FaultsEnded++;
            s.Record(c, o, FaultPhase.Total, ended - w.RaisedAt);
            if (read != 0)
            {
                s.Record(c, o, FaultPhase.Queued, read - w.RaisedAt);
                s.Record(c, o, FaultPhase.Handling, resolved - read);
            }
            s.Record(c, o, FaultPhase.Waking, ended - resolved);
        }
    }

    /// <summary>
    /// The outcome the metrics report: a fill that failed on the waiter's page with EEXIST,
    /// EAGAIN or ESRCH while it slept turns the wake that followed into that errno (the
    /// kernel's fills wake nothing when they fail: userfaultfd_copy jumps past
    /// wake_userfault on ret &lt; 0), unless a later fill placed the page itself.
    /// </summary>
    internal static UserfaultOutcome MetricOutcome(UffdWaiter w, UserfaultOutcome by)
    {
        if (w.FillErrno == Errno.OK || by is UserfaultOutcome.Copy or UserfaultOutcome.Zeropage or UserfaultOutcome.Continue or UserfaultOutcome.Poison or UserfaultOutcome.Move)
            return by;
        return w.FillErrno switch
        {
            Errno.EEXIST when by is not (UserfaultOutcome.Exit or UserfaultOutcome.Close or UserfaultOutcome.Signal) => UserfaultOutcome.Eexist,
            Errno.EAGAIN when by is not (UserfaultOutcome.Exit or UserfaultOutcome.Close or UserfaultOutcome.Signal) => UserfaultOutcome.Eagain,
            Errno.ESRCH => UserfaultOutcome.Esrch,
            _ => by,
        };
    }
}

public sealed partial class Mm
{
    /// <summary>The process's migration metrics.</summary>
    public MigrationStats Migration { get; } = new();

    /// <summary>Resident pages (RSS: anon, file and shmem pages mapped; a THP counts its 512).</summary>
    public long ResidentPages
    {
        get
        {
            using var _ = Kernel.Enter();
            return Exited ? 0 : RssAndSwapEntries().Rss;
        }
    }
}

public sealed partial class UserfaultfdCtx
{
    /// <summary>A resolving call that is not a fill (WAKE, an un-protecting WRITEPROTECT): one round trip.</summary>
    private void CountRoundTrip()
    {
        Kernel.Migration.RoundTrips++;
        Mm.Migration.RoundTrips++;
    }

    /// <summary>
    /// Accounts a fill (COPY, ZEROPAGE, CONTINUE, POISON, MOVE): a round trip, the pages (and
    /// for COPY and MOVE the bytes) it placed, and on EEXIST, EAGAIN or ESRCH the waiters of
    /// the pages it did not place (their outcome, <see cref="Kernel.MetricOutcome"/>).
    /// </summary>
    private FillResult Account(FillResult r, ulong start, ulong len, bool carriesBytes)
    {
        var done = r.Field is > 0 ? (ulong)r.Field.Value : 0;
        foreach (var s in (ReadOnlySpan<MigrationStats>)[Kernel.Migration, Mm.Migration])
        {
            s.RoundTrips++;
            s.PagesMoved += (long)(done / Kernel.PageSize);
            if (carriesBytes)
                s.BytesMoved += (long)done;
            switch (r.Errno)
            {
                case Errno.EEXIST:
                    s.FillsEexist++;
                    break;
                case Errno.EAGAIN:
                    s.FillsEagain++;
                    break;
                case Errno.ESRCH:
                    s.FillsEsrch++;
                    break;
            }
        }
        if (r.Errno is Errno.EEXIST or Errno.EAGAIN or Errno.ESRCH && len > done)
        {
            foreach (var w in _faultPending.Concat(_faultWaiting))
            {
                var a = w.Msg.RealAddress & ~(Kernel.PageSize - 1);
                if (a >= start + done && a - start < len)
                    w.FillErrno = r.Errno;
            }
        }
        return r;
    }
}
