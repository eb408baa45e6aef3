using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>
/// Fault injection: rules added at run time, decided at the points the kernel reaches, and
/// an injection log of every firing (<see cref="InjectRule"/>, <see cref="InjectSite"/>).
/// </summary>
/// <remarks>
/// Everything here is protected by <see cref="Lock"/>, like the rest of the machine. A
/// site's hook costs one field read when the machine has no rule (<see cref="_modelRules"/>).
/// Listeners of <see cref="InjectionFired"/> run after the lock is released.
/// </remarks>
public sealed partial class Kernel
{
    /// <summary>Firings the log keeps (the oldest are dropped first; sequence numbers go on).</summary>
    public const int InjectionLogCapacity = 4096;
    /// <summary>Rules a machine may hold at once.</summary>
    public const int MaxInjectRules = 64;

    private readonly List<ActiveRule> _rules = [];
    private readonly Queue<InjectionRecord> _injLog = new();
    private long _injSeq;
    private int _nextRuleId = 1;
    private int _modelRules;
    private int _wireRules;
    private static int s_wireRulesAnywhere;

    /// <summary>Whether any machine in the process holds a wire rule (the server's interceptor skips every lookup while none does).</summary>
    public static bool WireRulesAnywhere => Volatile.Read(ref s_wireRulesAnywhere) > 0;

    /// <summary>
    /// The machine's model step: one per operation a thread starts and per userfaultfd
    /// ioctl or read. The same sequence of calls gives the same steps; the log records it.
    /// </summary>
    public long ModelStep { get; private set; }

    /// <summary>The wall clock for <see cref="InjectRule.DurationMs"/> (milliseconds); tests may replace it.</summary>
    public Func<long> InjectClock { get; set; } = () => Environment.TickCount64;

    /// <summary>Raised after the machine lock is released, once per firing.</summary>
    public event Action<InjectionRecord>? InjectionFired;

    /// <summary>Adds a rule; null and the reason when its arguments are inconsistent or the machine holds too many.</summary>
    public ActiveRule? AddInjectRule(InjectRule rule, out string? error)
    {
        using var _ = Enter();
        error = rule.Validate();
        if (error is null && _rules.Count >= MaxInjectRules)
            error = $"the machine already holds {MaxInjectRules} injection rules";
        if (error is not null)
            return null;
        var a = new ActiveRule(_nextRuleId++, rule, InjectClock());
        _rules.Add(a);
        if (rule.IsWireSite)
        {
            _wireRules++;
            Interlocked.Increment(ref s_wireRulesAnywhere);
        }
        else
            _modelRules++;
        return a;
    }

    /// <summary>Removes a rule (false when no rule has that id). A long-term pin it holds is released.</summary>
    public bool RemoveInjectRule(int id)
    {
        using var _ = Enter();
        var i = _rules.FindIndex(r => r.Id == id);
        if (i < 0)
            return false;
        var a = _rules[i];
        _rules.RemoveAt(i);
        if (a.Rule.IsWireSite)
        {
            _wireRules--;
            Interlocked.Decrement(ref s_wireRulesAnywhere);
        }
        else
            _modelRules--;
        ReleaseLongtermPins(a);
        return true;
    }

    /// <summary>The rules, in the order they were added.</summary>
    public IReadOnlyList<ActiveRule> InjectRules
    {
        get
        {
            using var _ = Enter();
            return [.. _rules];
        }
    }

    /// <summary>The firings after <paramref name="afterSeq"/> still in the log, oldest first, at most <paramref name="max"/>.</summary>
    public IReadOnlyList<InjectionRecord> InjectionLog(long afterSeq = 0, int max = InjectionLogCapacity)
    {
        using var _ = Enter();
        return [.. _injLog.Where(r => r.Seq > afterSeq).Take(max)];
    }

    /// <summary>Firings since the machine started (the log keeps only the latest).</summary>
    public long InjectionCount
    {
        get
        {
            using var _ = Enter();
            return _injSeq;
        }
    }

    /// <summary>
    /// Decides the rules of <paramref name="site"/> whose scope holds the event: the first
    /// that fires is logged and returned (null: the kernel goes on as usual).
    /// </summary>
    internal ActiveRule? Inject(InjectSite site, Mm? mm, UserfaultfdCtx? ctx, SimThread? t, ulong addr, string detail = "",
        Func<InjectRule, bool>? eligible = null)
    {
        if (_modelRules == 0)
            return null;
        Debug.Assert(Monitor.IsEntered(Lock));
        var now = -1L;
        foreach (var a in _rules)
        {
            if (a.Rule.Site != site || !InScope(a.Rule, mm, ctx, t, addr) || (eligible is not null && !eligible(a.Rule)))
                continue;
            if (now < 0)
                now = InjectClock();
            if (!a.Decide(now))
                continue;
            LogInjection(a, mm, ctx, t, addr, detail);
            return a;
        }
        return null;
    }

    /// <summary>Whether a rule's scope (mm, uffd, thread, address range) holds the event.</summary>
    private static bool InScope(InjectRule r, Mm? mm, UserfaultfdCtx? ctx, SimThread? t, ulong addr) =>
        (r.MmId is not { } m || mm?.Id == m)
        && (r.UffdId is not { } u || ctx?.Id == u)
        && (r.Tid is not { } tid || t?.Tid == tid)
        && (r.End == 0 || (addr >= r.Start && addr < r.End));

    internal void LogInjection(ActiveRule a, Mm? mm, UserfaultfdCtx? ctx, SimThread? t, ulong addr, string detail)
    {
        var rec = new InjectionRecord(++_injSeq, ModelStep, a.Rule.Site, a.Id, a.Rule.Name,
            mm?.Id ?? ctx?.Mm.Id ?? 0, ctx?.Id ?? 0, t?.Tid ?? 0, addr, detail);
        _injLog.Enqueue(rec);
        while (_injLog.Count > InjectionLogCapacity)
            _injLog.Dequeue();
        if (InjectionFired is { } h)
            DeferUntilUnlocked(() => h(rec));
    }

    /// <summary>
    /// A wire site (the server's side): decides the rules of <paramref name="site"/> for an
    /// RPC <paramref name="method"/> (or a stream of the context <paramref name="uffdId"/>;
    /// 0: none), logs a firing and returns what the server applies after the lock is
    /// released (the delay is drawn from the rule's PRNG here, under the lock).
    /// </summary>
    public WireDecision? DecideWire(InjectSite site, string method, int uffdId, Func<InjectRule, bool>? eligible = null)
    {
        if (_wireRules == 0)
            return null;
        using var _ = Enter();
        var now = -1L;
        foreach (var a in _rules)
        {
            var r = a.Rule;
            if (r.Site != site || (eligible is not null && !eligible(r)))
                continue;
            if (r.Method.Length > 0 && method != r.Method && !method.EndsWith("/" + r.Method, StringComparison.Ordinal))
                continue;
            if (r.UffdId is { } u && u != uffdId)
                continue;
            if (now < 0)
                now = InjectClock();
            if (!a.Decide(now))
                continue;
            LogInjection(a, null, _ctxs.Find(c => c.Id == uffdId), null, 0, method);
            return new WireDecision(a.Id, r, a.NextDelayMs());
        }
        return null;
    }

    /// <summary>Whether the machine holds any wire rule (read without the lock: a hint for the fast path).</summary>
    public bool HasWireRules => Volatile.Read(ref _wireRules) > 0;

    /// <summary>Whether rule <paramref name="ruleId"/> is still in place (a stall lasts until its rule is removed).</summary>
    public bool WireRuleActive(int ruleId)
    {
        using var _ = Enter();
        return _rules.Exists(r => r.Id == ruleId);
    }

    /// <summary>
    /// One model step begins (a thread starts an operation, or a userfaultfd ioctl or read
    /// runs): the kernel-internal event rules are decided here, and a firing applies its
    /// event before the step runs, as if the kernel did it just then.
    /// </summary>
    internal void InjectPoint(Mm? mm)
    {
        ModelStep++;
        RunSomePreempted();
        if (_modelRules == 0)
            return;
        foreach (var a in _rules.ToList())
        {
            if (!a.Rule.IsEventSite || (a.Rule.MmId is { } m && mm is not null && mm.Id != m))
                continue;
            if (a.Decide(InjectClock()) && !ApplyEvent(a, detailPrefix: ""))
                a.Unfire();
        }
    }

    /// <summary>
    /// Fires rule <paramref name="ruleId"/> once now (an event or signal site), regardless of
    /// its schedule: the injected event happens at this instant. The records it logged; none and the reason
    /// when the rule is not an event site or found nothing to act on.
    /// </summary>
    public IReadOnlyList<InjectionRecord> FireNow(int ruleId, out string? error)
    {
        using var _ = Enter();
        error = null;
        var a = _rules.Find(r => r.Id == ruleId);
        if (a is null)
        {
            error = $"no injection rule {ruleId}";
            return [];
        }
        if (!a.Rule.IsEventSite && a.Rule.Site is not (InjectSite.Signal or InjectSite.FatalSignal))
        {
            error = $"rule {ruleId} ({a.Rule.Site}) fires where the kernel reaches its site, not on demand";
            return [];
        }
        var before = _injSeq;
        var acted = a.Rule.Site is InjectSite.Signal or InjectSite.FatalSignal
            ? SignalSleepers(a, onDemand: true)
            : ApplyEvent(a, detailPrefix: "now ");
        if (acted)
            a.CountFiring();
        if (!acted)
        {
            error = "nothing in the rule's scope to act on";
            return [];
        }
        return [.. _injLog.Where(r => r.Seq > before)];
    }

    /// <summary>The live address spaces a rule may act on, by its scope.</summary>
    private List<Mm> ScopeMms(InjectRule r) =>
        [.. _mms.Where(m => !m.Exited && (r.MmId is not { } id || m.Id == id))];
}
