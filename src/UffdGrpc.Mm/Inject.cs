namespace UffdGrpc.Mm;

/// <summary>
/// Where an injection rule fires. Each site makes the model do what the kernel does when the
/// real event happens at that point (the method that applies it names the kernel function).
/// </summary>
public enum InjectSite
{
    None = 0,

    // Kernel races and errors a handler meets (evaluated when the kernel reaches the point).

    /// <summary>A fill, MOVE or WRITEPROTECT finds ctx->mmap_changing set: EAGAIN (fills: field -EAGAIN).</summary>
    MmapChanging = 1,
    /// <summary>mfill_atomic stops after <see cref="InjectRule.Pages"/> pages: the partial count, EAGAIN.</summary>
    FillPartial = 2,
    /// <summary>Another thread's fill of the page at <see cref="InjectRule.Pages"/> wins the race: EEXIST there.</summary>
    FillRace = 3,
    /// <summary>The page (or PTE table) a fill allocates cannot be charged: ENOMEM at that page.</summary>
    FillNomem = 4,
    /// <summary>The target process is exiting (mmget_not_zero fails): the fill gets ESRCH and the process exits.</summary>
    TargetExiting = 5,
    /// <summary>A read races with a fault being queued: the oldest unread event is read before the unread faults.</summary>
    ReadEventFirst = 6,
    /// <summary>A fault's page allocation fails after the OOM killer ran: VM_FAULT_OOM (a user fault retries; a kernel access gets EFAULT; GUP ENOMEM).</summary>
    FaultOom = 7,

    // Signals to a thread asleep in a userfault (eligible when its PAGEFAULT message is read).

    /// <summary>A non-fatal signal: VM_FAULT_RETRY, the signal is handled, the access faults again.</summary>
    Signal = 10,
    /// <summary>SIGKILL: the thread group exits, its fault disappears.</summary>
    FatalSignal = 11,

    // Kernel-internal events no handler is told about (eligible at each operation a thread
    // starts and each resolving ioctl, or fired at once by Inject).

    /// <summary>A PMD-mapped THP is split (split_huge_pmd), as a partial mprotect or munmap does.</summary>
    ThpSplit = 20,
    /// <summary>khugepaged collapses a PMD range into a THP (collapse_huge_page), as MADV_COLLAPSE does.</summary>
    Collapse = 21,
    /// <summary>Reclaim of the range (shrink_folio_list), as MADV_PAGEOUT does.</summary>
    Reclaim = 22,
    /// <summary>Page migration (migrate_pages): a new PFN, the same contents, uffd-wp and soft-dirty kept.</summary>
    Migrate = 23,
    /// <summary>A hardware memory error in a present anonymous page (memory_failure): the next access gets SIGBUS BUS_MCEERR_AR.</summary>
    HwPoison = 24,
    /// <summary>A long-term pin (FOLL_LONGTERM, as vfio or io_uring hold) of the present pages of the range.</summary>
    LongtermPin = 25,

    // The handler's side of the wire (the server applies them).

    /// <summary>A handler stream (ReadEvents, Serve) ends after <see cref="InjectRule.Count"/> messages.</summary>
    StreamCut = 30,
    /// <summary>A handler stream delivers nothing for <see cref="InjectRule.DelayMs"/> (0: until the rule is removed).</summary>
    StreamStall = 31,
    /// <summary>Each message of a handler stream is delivered late (DelayMs ± JitterMs).</summary>
    StreamDelay = 32,
    /// <summary>An RPC of <see cref="InjectRule.Method"/> is delayed by DelayMs ± JitterMs.</summary>
    RpcDelay = 33,
    /// <summary>An RPC of <see cref="InjectRule.Method"/> fails with <see cref="InjectRule.Status"/> before it runs.</summary>
    RpcAbort = 34,
}

/// <summary>
/// An injection rule, after Linux's struct fault_attr (probability, interval, times, space
/// and a task filter) and Toxiproxy's toxics: a site, a scope, when it fires, and the
/// attributes of what it does. Every rule draws from a PRNG of its own seeded with
/// <see cref="Seed"/>, so the same rules and the same sequence of calls fire at the same
/// events.
/// </summary>
public sealed record InjectRule
{
    public InjectSite Site { get; init; }
    /// <summary>A name the log repeats (free text).</summary>
    public string Name { get; init; } = "";

    // Scope: null / 0 means any.
    public int? MmId { get; init; }
    public int? UffdId { get; init; }
    public int? Tid { get; init; }
    /// <summary>Address range [Start, End) the event's address must fall in (End 0: any).</summary>
    public ulong Start { get; init; }
    public ulong End { get; init; }
    /// <summary>Wire sites: the RPC method ("uffd.v1.UserfaultfdService/UffdioCopy", or its last part); empty = any.</summary>
    public string Method { get; init; } = "";

    // When: fault_attr's interval, probability, times, and a window of eligible events.

    /// <summary>Fire on every Nth eligible event (fault_attr.interval; default 1).</summary>
    public long Every { get; init; } = 1;
    /// <summary>Probability in [0, 1] that an event passing <see cref="Every"/> fires (default 1).</summary>
    public double Probability { get; init; } = 1;
    /// <summary>Fire at most this many times (fault_attr.times); 0 = no limit.</summary>
    public long MaxFirings { get; init; }
    /// <summary>Skip the first N eligible events.</summary>
    public long After { get; init; }
    /// <summary>Stop after this many eligible events (0 = no end).</summary>
    public long Until { get; init; }
    /// <summary>Stop this many milliseconds (wall clock) after the rule was added (0 = no end). Not reproducible by a seed.</summary>
    public long DurationMs { get; init; }
    /// <summary>The rule's PRNG seed.</summary>
    public ulong Seed { get; init; }

    // What it does.

    /// <summary>FillPartial: pages filled before the stop; FillRace: the page of the fill that loses (0 = first).</summary>
    public long Pages { get; init; }
    /// <summary>FillRace: the winning fill wakes the range (false: it used DONTWAKE, so the loser's handler must WAKE).</summary>
    public bool Wake { get; init; }
    /// <summary>StreamCut: messages delivered before the cut.</summary>
    public long Count { get; init; }
    public int DelayMs { get; init; }
    public int JitterMs { get; init; }
    /// <summary>RpcAbort: the gRPC status code.</summary>
    public int Status { get; init; }

    public bool IsWireSite => Site is >= InjectSite.StreamCut and <= InjectSite.RpcAbort;
    public bool IsEventSite => Site is >= InjectSite.ThpSplit and <= InjectSite.LongtermPin;

    /// <summary>The rule's arguments are consistent (null) or the reason they are not.</summary>
    public string? Validate()
    {
        if (!Enum.IsDefined(Site) || Site == InjectSite.None)
            return $"unknown site {(int)Site}";
        if (Every < 1)
            return "every must be at least 1";
        if (Probability is < 0 or > 1 || double.IsNaN(Probability))
            return "probability must be in [0, 1]";
        if (MaxFirings < 0 || After < 0 || Until < 0 || DurationMs < 0 || Pages < 0 || Count < 0 || DelayMs < 0 || JitterMs < 0)
            return "counts, windows and delays must not be negative";
        if (End != 0 && End <= Start)
            return "the address range is empty";
        if (Site == InjectSite.FillPartial && Pages < 1)
            return "fill_partial needs pages >= 1 (the pages filled before the stop)";
        if (Site == InjectSite.RpcAbort && Status is < 1 or > 16)
            return "rpc_abort needs a gRPC status code in 1..16";
        if (DelayMs > 600_000 || JitterMs > 600_000)
            return "delays are limited to 600000 ms";
        return null;
    }
}

/// <summary>
/// One firing of a rule, as the injection log keeps it: its position in the machine's log
/// (1, 2, ...), the machine's model step (<see cref="Kernel.ModelStep"/>) when it fired, the
/// site and rule, the objects and address it acted on (0: none), and what it did.
/// </summary>
public sealed record InjectionRecord(long Seq, long Step, InjectSite Site, int RuleId, string RuleName,
    int MmId, int UffdId, int Tid, ulong Address, string Detail);

/// <summary>An added rule and its state: its PRNG, eligible events seen, firings.</summary>
public sealed class ActiveRule
{
    private ulong _state;

    internal ActiveRule(int id, InjectRule rule, long addedAtMs)
    {
        Id = id;
        Rule = rule;
        AddedAtMs = addedAtMs;
        _state = rule.Seed;
    }

    public int Id { get; }
    public InjectRule Rule { get; }
    public long AddedAtMs { get; }
    public long Eligible { get; private set; }
    public long Firings { get; private set; }

    /// <summary>The rule's own stream, the same for the same seed on every platform.</summary>
    public ulong NextU64() => SplitMix64.Next(ref _state);

    /// <summary>A uniform integer in [0, n).</summary>
    public long NextBelow(long n) => n <= 1 ? 0 : (long)(NextU64() % (ulong)n);

    /// <summary>A uniform double in [0, 1).</summary>
    public double NextDouble() => (NextU64() >> 11) * (1.0 / (1UL << 53));

    /// <summary>DelayMs ± JitterMs from the rule's PRNG (never negative).</summary>
    public int NextDelayMs()
    {
        var j = Rule.JitterMs == 0 ? 0 : (int)NextBelow((2L * Rule.JitterMs) + 1) - Rule.JitterMs;
        return Math.Max(0, Rule.DelayMs + j);
    }

    /// <summary>Counts one eligible event and decides whether the rule fires on it.</summary>
    internal bool Decide(long nowMs)
    {
        var r = Rule;
        var n = ++Eligible;
        if (r.MaxFirings > 0 && Firings >= r.MaxFirings)
            return false;
        if (r.DurationMs > 0 && nowMs - AddedAtMs >= r.DurationMs)
            return false;
        if (n <= r.After || (r.Until > 0 && n > r.Until))
            return false;
        if ((n - r.After) % r.Every != 0)
            return false;
        if (r.Probability < 1 && NextDouble() >= r.Probability)
            return false;
        Firings++;
        return true;
    }

    /// <summary>A firing that found nothing to act on does not count.</summary>
    internal void Unfire() => Firings--;

    /// <summary>A firing on demand (FireNow), outside the schedule.</summary>
    internal void CountFiring() => Firings++;

    /// <summary>LongtermPin: the pages this rule holds pinned until it is removed.</summary>
    internal List<Page> Pinned { get; } = [];

    /// <summary>Whether the rule is spent (it can never fire again).</summary>
    public bool Spent => Rule.MaxFirings > 0 && Firings >= Rule.MaxFirings;
}

/// <summary>A wire rule that fired: its id, the rule, and the delay drawn for this firing (DelayMs ± JitterMs).</summary>
public readonly record struct WireDecision(int RuleId, InjectRule Rule, int DelayMs);

/// <summary>SplitMix64 (Steele, Lea and Flood): the model's seeded PRNG, the same on every platform.</summary>
public static class SplitMix64
{
    public static ulong Next(ref ulong state)
    {
        var z = state += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
