using System.Globalization;
using UffdGrpc.Mm;

namespace UffdGrpc.Scenarios;

/// <summary>
/// The <c>inject</c> commands (tests/conformance/README.md): fault-injection rules added,
/// fired and removed from a script, and the injection log printed in the trace.
/// </summary>
public sealed partial class ScenarioInterpreter
{
    private long _injectLogSeen;

    /// <summary>The script's name of each site the interpreter can script (the wire sites need a server and a stream: not here).</summary>
    public static readonly IReadOnlyDictionary<string, InjectSite> InjectSiteNames = new Dictionary<string, InjectSite>
    {
        ["mmap_changing"] = InjectSite.MmapChanging,
        ["fill_partial"] = InjectSite.FillPartial,
        ["fill_race"] = InjectSite.FillRace,
        ["fill_nomem"] = InjectSite.FillNomem,
        ["target_exiting"] = InjectSite.TargetExiting,
        ["read_event_first"] = InjectSite.ReadEventFirst,
        ["fault_oom"] = InjectSite.FaultOom,
        ["signal"] = InjectSite.Signal,
        ["fatal_signal"] = InjectSite.FatalSignal,
        ["thp_split"] = InjectSite.ThpSplit,
        ["collapse"] = InjectSite.Collapse,
        ["reclaim"] = InjectSite.Reclaim,
        ["migrate"] = InjectSite.Migrate,
        ["hwpoison"] = InjectSite.HwPoison,
        ["longterm_pin"] = InjectSite.LongtermPin,
    };

    private const string InjectUsage = "USAGE inject [now] SITE [NAME FIRST COUNT] [every=N] [p=X] [times=N] [after=N] [until=N] [seed=N] [pages=N] [wake] [uffd=uN] [mm=main|child] [tid=worker|child] | inject remove N | inject log";

    /// <summary>
    /// <c>inject SITE ...</c> adds a rule (<c>ok rule=N</c>); <c>inject now SITE ...</c> adds
    /// one, fires it at once and removes it (<c>ok fired=N</c>); <c>inject remove N</c>;
    /// <c>inject log</c> prints the firings since the last <c>inject log</c>.
    /// </summary>
    private async Task CmdInjectAsync(string[] argv)
    {
        if (argv.Length < 2)
        {
            Emit(InjectUsage);
            return;
        }
        switch (argv[1])
        {
            case "log":
                foreach (var r in await _k.InjectionLogAsync(_injectLogSeen).ConfigureAwait(false))
                {
                    _injectLogSeen = r.Seq;
                    var site = InjectSiteNames.FirstOrDefault(kv => kv.Value == r.Site).Key ?? r.Site.ToString();
                    Emit(r.Address == 0 ? $"injection {site}" : $"injection {site} {AddrName(r.Address)}");
                }
                Emit("ok");
                return;
            case "remove":
                if (argv.Length < 3 || !int.TryParse(argv[2], NumberStyles.None, CultureInfo.InvariantCulture, out var id))
                {
                    Emit(InjectUsage);
                    return;
                }
                Emit(await _k.RemoveInjectRuleAsync(id).ConfigureAwait(false) ? "ok" : "ENOENT");
                return;
        }
        var now = argv[1] == "now";
        var at = now ? 2 : 1;
        if (argv.Length <= at || !InjectSiteNames.TryGetValue(argv[at], out var s))
        {
            Emit(InjectUsage);
            return;
        }
        var rule = ParseInjectRule(argv, at + 1, s);
        if (rule is null)
        {
            Emit(InjectUsage);
            return;
        }
        var (ruleId, error) = await _k.AddInjectRuleAsync(rule).ConfigureAwait(false);
        if (error is not null)
        {
            Emit("EINVAL " + error);
            return;
        }
        if (!now)
        {
            Emit($"ok rule={ruleId}");
            return;
        }
        var (records, why) = await _k.FireInjectRuleAsync(ruleId).ConfigureAwait(false);
        await _k.RemoveInjectRuleAsync(ruleId).ConfigureAwait(false);
        Emit(why is null ? $"ok fired={records.Count}" : "ENOENT " + why);
    }

    /// <summary>The rule of an <c>inject</c> line: an optional NAME FIRST COUNT range, then key=value words.</summary>
    private InjectRule? ParseInjectRule(string[] argv, int at, InjectSite site)
    {
        var rule = new InjectRule { Site = site, Name = string.Join(' ', argv) };
        if (argv.Length > at + 2 && !argv[at].Contains('=', StringComparison.Ordinal) && argv[at] != "wake")
        {
            if (!GetRange(argv, at, out var start, out var len))
                return null;
            rule = rule with { Start = start, End = start + len };
            at += 3;
        }
        for (var i = at; i < argv.Length; i++)
        {
            var w = argv[i];
            if (w == "wake")
            {
                rule = rule with { Wake = true };
                continue;
            }
            var eq = w.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
                return null;
            var key = w[..eq];
            var val = w[(eq + 1)..];
            if (key == "p")
            {
                if (!double.TryParse(val, NumberStyles.Float, CultureInfo.InvariantCulture, out var p))
                    return null;
                rule = rule with { Probability = p };
                continue;
            }
            if (key is "uffd" or "mm" or "tid")
            {
                var r2 = InjectScope(rule, key, val);
                if (r2 is null)
                    return null;
                rule = r2;
                continue;
            }
            var n = ScenarioParsing.StrToULL(val, out var used);
            if (used != val.Length || used == 0 || n > long.MaxValue)
                return null;
            var v = (long)n;
            switch (key)
            {
                case "every": rule = rule with { Every = v }; break;
                case "times": rule = rule with { MaxFirings = v }; break;
                case "after": rule = rule with { After = v }; break;
                case "until": rule = rule with { Until = v }; break;
                case "seed": rule = rule with { Seed = n }; break;
                case "pages": rule = rule with { Pages = v }; break;
                default: return null;
            }
        }
        return rule;
    }

    /// <summary>Scope words: <c>uffd=uN</c>, <c>mm=main|child</c> and <c>tid=worker|child</c> name the script's objects (backend handles).</summary>
    private InjectRule? InjectScope(InjectRule rule, string key, string val)
    {
        switch (key)
        {
            case "uffd":
                if (!val.StartsWith('u') || !int.TryParse(val.AsSpan(1), NumberStyles.None, CultureInfo.InvariantCulture, out var u)
                    || u >= _uffds.Count || _uffds[u].Handle < 0)
                    return null;
                return rule with { UffdId = _uffds[u].Handle };
            case "mm":
                return val switch
                {
                    "main" => rule with { MmId = _mainProc },
                    "child" when _child.Alive => rule with { MmId = _child.Process },
                    _ => null,
                };
            default:
                return val switch
                {
                    "worker" => rule with { Tid = _worker.Tid },
                    "child" when _child.Alive => rule with { Tid = _child.Tid },
                    _ => null,
                };
        }
    }
}
