using System.Security.Cryptography;
using System.Text;
using UffdGrpc.Mm;

namespace UffdGrpc.Scenarios;

/// <summary>One distinct outcome of an exploration: its digest, a description, and the seeds that produce it.</summary>
public sealed record ExploreOutcome(string Digest, string Summary, IReadOnlyList<ulong> Seeds, bool Breaks);

/// <summary>
/// Runs one workload under many schedule seeds and groups the runs by outcome, as
/// FoundationDB's and TigerBeetle's simulators do: each distinct outcome comes with the
/// seeds that produce it, so any of them replays exactly.
/// </summary>
public static class Explorer
{
    /// <summary>The trace of <paramref name="script"/> replayed in-process under schedule seed <paramref name="seed"/> (null: the default order).</summary>
    public static async Task<string> ReplayAsync(string script, ulong? seed, KernelProfile profile = KernelProfile.V6_18)
    {
        var kernel = new Kernel(profile);
        kernel.SetSchedule(seed);
        var sw = new StringWriter { NewLine = "\n" };
        await using var backend = new InProcessBackend(kernel);
        using var reader = new StringReader(script);
        await new ScenarioInterpreter(backend, sw).RunAsync(reader).ConfigureAwait(false);
        return sw.ToString();
    }

    /// <summary>
    /// Explores a scenario script over seeds <paramref name="first"/> .. first+count-1. An
    /// outcome breaks the expectation when <paramref name="breaks"/> says so for its trace.
    /// </summary>
    public static async Task<IReadOnlyList<ExploreOutcome>> ExploreScenarioAsync(string script, ulong first, int count, Func<string, bool>? breaks = null)
    {
        var byDigest = new Dictionary<string, (string Trace, List<ulong> Seeds)>();
        var order = new List<string>();
        for (var i = 0; i < count; i++)
        {
            var seed = first + (ulong)i;
            var trace = await ReplayAsync(script, seed).ConfigureAwait(false);
            var d = Digest(trace);
            if (!byDigest.TryGetValue(d, out var e))
            {
                e = (trace, []);
                byDigest[d] = e;
                order.Add(d);
            }
            e.Seeds.Add(seed);
        }
        return [.. order.Select(d => new ExploreOutcome(d, FirstLines(byDigest[d].Trace), byDigest[d].Seeds, breaks?.Invoke(byDigest[d].Trace) ?? false))];
    }

    /// <summary>Explores the dirty-tracking workload with <paramref name="handler"/>; an outcome with a lost write breaks the property.</summary>
    public static IReadOnlyList<ExploreOutcome> ExploreDirtyTracking(DirtyHandler handler, ulong first, int count)
    {
        var groups = new Dictionary<string, (DirtyOutcome Outcome, List<ulong> Seeds)>();
        var order = new List<string>();
        for (var i = 0; i < count; i++)
        {
            var seed = first + (ulong)i;
            var o = DirtyTrackingWorkload.Run(seed, handler);
            var key = o.Summary;
            if (!groups.TryGetValue(key, out var g))
            {
                g = (o, []);
                groups[key] = g;
                order.Add(key);
            }
            g.Seeds.Add(seed);
        }
        return [.. order.Select(k => new ExploreOutcome(Digest(k), k, groups[k].Seeds, groups[k].Outcome.LostWrite is not null))];
    }

    /// <summary>The first 12 hex digits of the SHA-256 of <paramref name="text"/>.</summary>
    public static string Digest(string text) => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text)))[..12];

    private static string FirstLines(string trace)
    {
        var lines = trace.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        return $"{lines.Length} trace lines, last: {(lines.Length > 0 ? lines[^1] : "(empty)")}";
    }
}
