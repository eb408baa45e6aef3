using System.CommandLine;
using System.Globalization;
using UffdGrpc.Scenarios;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>explore SCENARIO --seeds N</c>: the same scenario under N schedule seeds, each distinct
/// outcome (by trace digest) with its seeds and the command that replays one;
/// <c>explore --workload dirty-two-calls|dirty-wp-matching</c>: the dirty-tracking workload.
/// With <c>--expect</c> a seed whose outcome breaks the property fails the run (status 1).
/// </summary>
public static class ExploreCommand
{
    public static Command Build()
    {
        var file = new Argument<string?>("scenario") { Description = "Scenario script (.scn), or a session journal (.journal, from session export)", Arity = ArgumentArity.ZeroOrOne };
        var seeds = new Option<int>("--seeds") { Description = "How many schedule seeds to run", DefaultValueFactory = _ => 100 };
        var first = new Option<ulong>("--first-seed") { Description = "The first seed", DefaultValueFactory = _ => 1 };
        var workload = new Option<string?>("--workload") { Description = "A built-in workload instead of a scenario: dirty-two-calls or dirty-wp-matching" };
        var expect = new Option<string?>("--expect")
        {
            Description = "Property every seed must keep: 'golden' (a scenario's trace equals its .out), 'absent:TEXT' / 'present:TEXT' (a trace line), 'no-lost-writes' (the dirty-tracking workloads), 'same-state' (a journal: every seed ends in the journal's state)",
        };
        var cmd = new Command("explore", "Run a workload under many schedule seeds and report each distinct outcome with the seeds that produce it.") { file, seeds, first, workload, expect };
        cmd.SetAction(async (parse, ct) =>
        {
            var n = parse.GetValue(seeds);
            var s0 = parse.GetValue(first);
            var w = parse.GetValue(workload);
            var path = parse.GetValue(file);
            var exp = parse.GetValue(expect);
            if (n < 1 || (w is null) == (path is null))
            {
                await Console.Error.WriteLineAsync("explore: give a scenario or --workload, and --seeds of at least 1").ConfigureAwait(false);
                return 2;
            }
            if (path is not null && path.EndsWith(".journal", StringComparison.Ordinal))
                return await SessionCommand.ExploreAsync(path, s0, n, exp).ConfigureAwait(false);
            IReadOnlyList<ExploreOutcome> outcomes;
            string replay;
            if (w is not null)
            {
                DirtyHandler? h = w switch { "dirty-two-calls" => DirtyHandler.TwoCalls, "dirty-wp-matching" => DirtyHandler.WpMatching, _ => null };
                if (h is null || exp is not (null or "no-lost-writes"))
                {
                    await Console.Error.WriteLineAsync("explore: --workload is dirty-two-calls or dirty-wp-matching; its --expect is no-lost-writes").ConfigureAwait(false);
                    return 2;
                }
                outcomes = Explorer.ExploreDirtyTracking(h.Value, s0, n);
                replay = $"explore --workload {w} --first-seed {{0}} --seeds 1";
            }
            else
            {
                string script;
                try
                {
                    script = await File.ReadAllTextAsync(path!, ct).ConfigureAwait(false);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    await Console.Error.WriteLineAsync($"explore: {path}: {e.Message}").ConfigureAwait(false);
                    return 2;
                }
                var breaks = await PropertyAsync(path!, exp).ConfigureAwait(false);
                if (exp is not null && breaks is null)
                {
                    await Console.Error.WriteLineAsync($"explore: --expect: unknown property or no golden beside the scenario: {exp}").ConfigureAwait(false);
                    return 2;
                }
                outcomes = await Explorer.ExploreScenarioAsync(script, s0, n, breaks).ConfigureAwait(false);
                replay = $"replay {path} --schedule-seed {{0}}";
            }
            Console.WriteLine($"explore: {n} seeds from {s0}: {outcomes.Count} distinct outcome(s)");
            foreach (var o in outcomes)
            {
                var seedList = string.Join(',', o.Seeds.Take(12).Select(x => x.ToString(CultureInfo.InvariantCulture))) + (o.Seeds.Count > 12 ? ",..." : "");
                Console.WriteLine($"  {o.Digest} {(o.Breaks ? "BREAKS" : "ok    ")} {o.Seeds.Count,5} seed(s) [{seedList}]: {o.Summary}");
                Console.WriteLine("    replay: uffdgrpc " + string.Format(CultureInfo.InvariantCulture, replay, o.Seeds[0]));
            }
            if (exp is not null && outcomes.FirstOrDefault(o => o.Breaks) is { } bad)
            {
                Console.WriteLine($"explore: seed {bad.Seeds.Min()} breaks {exp}; replay it with: uffdgrpc " + string.Format(CultureInfo.InvariantCulture, replay, bad.Seeds.Min()));
                return 1;
            }
            return 0;
        });
        return cmd;
    }

    /// <summary>The property of <c>--expect</c> for a scenario's trace (true: broken); null when unknown.</summary>
    private static async Task<Func<string, bool>?> PropertyAsync(string path, string? exp)
    {
        if (exp is null)
            return null;
        if (exp == "golden")
        {
            var golden = Path.ChangeExtension(path, ".out");
            if (!File.Exists(golden))
                return null;
            var text = await File.ReadAllTextAsync(golden).ConfigureAwait(false);
            return trace => trace != text;
        }
        if (exp.StartsWith("absent:", StringComparison.Ordinal))
            return trace => trace.Split('\n').Any(l => l.Contains(exp[7..], StringComparison.Ordinal));
        if (exp.StartsWith("present:", StringComparison.Ordinal))
            return trace => !trace.Split('\n').Any(l => l.Contains(exp[8..], StringComparison.Ordinal));
        return null;
    }
}
