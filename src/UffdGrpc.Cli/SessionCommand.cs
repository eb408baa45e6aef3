using System.CommandLine;
using System.Globalization;
using UffdGrpc.Client;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>session export</c> writes a journaled machine's session journal to a file;
/// <c>session replay</c> re-executes one (against a server, or the real services hosted
/// in-process) and checks every step, answer and the final state digest; exploring a
/// journal under other schedule seeds groups the outcomes by state digest.
/// </summary>
public static class SessionCommand
{
    public static Command Build()
    {
        var session = new Command("session", "Session journals: export a journaled machine's journal; replay one and check every step.");
        session.Subcommands.Add(BuildExport());
        session.Subcommands.Add(BuildReplay());
        return session;
    }

    private static Command BuildExport()
    {
        var server = new Option<string>("--server") { Description = "The server", DefaultValueFactory = _ => CliCommands.DefaultServer };
        var machine = new Option<long>("--machine") { Description = "A machine created with settings.journal", Required = true };
        var output = new Option<string>("--out", "-o") { Description = "The journal file to write", Required = true };
        var cmd = new Command("export", "Write a journaled machine's session journal (and its state digest now) to a file.") { server, machine, output };
        cmd.SetAction(async (parse, ct) =>
        {
            using var client = CliCommands.Connect(parse.GetValue(server)!);
            var journal = await SessionJournal.ExportAsync(client, parse.GetValue(machine), ct).ConfigureAwait(false);
            journal.Save(parse.GetValue(output)!);
            Console.WriteLine($"session: {journal.Entries.Count} steps, state digest {Convert.ToHexString(journal.End.StateDigest.Span).ToLowerInvariant()} -> {parse.GetValue(output)}");
            return 0;
        });
        return cmd;
    }

    private static Command BuildReplay()
    {
        var file = new Argument<string>("journal") { Description = "A journal file (session export)" };
        var server = new Option<string?>("--server") { Description = "Replay against this server instead of the services hosted in-process" };
        var seed = new Option<ulong?>("--schedule-seed") { Description = "Replay under another schedule seed (answers are then not compared; see explore)" };
        var cmd = new Command("replay", "Re-execute a session journal and check every step, every answer and the final state digest; print the first divergence.") { file, server, seed };
        cmd.SetAction(async (parse, ct) =>
        {
            if (Load(parse.GetValue(file)!) is not { } journal)
                return 2;
            var s = parse.GetValue(seed);
            var report = await WithServerAsync(parse.GetValue(server), c => new SessionReplayer(c) { ScheduleSeed = s }.ReplayAsync(journal, ct)).ConfigureAwait(false);
            var digest = Convert.ToHexString(report.StateDigest).ToLowerInvariant();
            if (s is not null)
            {
                Console.WriteLine($"session: {report.Steps} steps under schedule seed {s}: state digest {digest}" + (report.First is { } stop ? $"; stopped at {stop}" : ""));
                return 0;
            }
            if (report.First is { } first)
            {
                Console.WriteLine($"session: DIVERGED at {first}");
                return 1;
            }
            Console.WriteLine($"session: {report.Steps} steps replayed identically; state digest {digest}");
            return 0;
        });
        return cmd;
    }

    /// <summary>
    /// explore JOURNAL: the journal's calls under <paramref name="n"/> schedule seeds, grouped
    /// by final state digest. With <paramref name="expect"/> "same-state", a seed whose final
    /// state differs from the journal's breaks the property: the exit status is 1 and the
    /// first such seed's replay command is printed.
    /// </summary>
    internal static async Task<int> ExploreAsync(string path, ulong first, int n, string? expect)
    {
        if (expect is not (null or "same-state"))
        {
            Console.Error.WriteLine("explore: a journal's --expect is same-state");
            return 2;
        }
        if (Load(path) is not { } journal)
            return 2;
        var recorded = Convert.ToHexString(journal.End.StateDigest.Span).ToLowerInvariant();
        var outcomes = await WithServerAsync(null, async c =>
        {
            var byDigest = new Dictionary<string, (List<ulong> Seeds, string Summary)>(StringComparer.Ordinal);
            for (var i = 0; i < n; i++)
            {
                var seed = first + (ulong)i;
                var r = await new SessionReplayer(c) { ScheduleSeed = seed }.ReplayAsync(journal).ConfigureAwait(false);
                var digest = Convert.ToHexString(r.StateDigest).ToLowerInvariant();
                if (!byDigest.TryGetValue(digest, out var o))
                    byDigest[digest] = o = ([], r.First is { } stop ? $"stopped at {stop}" : $"{r.Steps} steps");
                o.Seeds.Add(seed);
            }
            return byDigest;
        }).ConfigureAwait(false);
        Console.WriteLine($"explore: {n} seeds from {first}: {outcomes.Count} distinct outcome(s); the journal's state is {recorded[..12]}");
        foreach (var (digest, o) in outcomes)
        {
            var seeds = string.Join(',', o.Seeds.Take(12).Select(x => x.ToString(CultureInfo.InvariantCulture))) + (o.Seeds.Count > 12 ? ",..." : "");
            var breaks = expect is not null && digest != recorded;
            Console.WriteLine($"  {digest[..12]} {(breaks ? "BREAKS" : "ok    ")} {o.Seeds.Count,5} seed(s) [{seeds}]: {o.Summary}");
            Console.WriteLine($"    replay: uffdgrpc session replay {path} --schedule-seed {o.Seeds[0]}");
        }
        var breaking = outcomes.Where(o => o.Key != recorded).SelectMany(o => o.Value.Seeds).Order().ToList();
        if (expect is not null && breaking.Count > 0)
        {
            Console.WriteLine($"explore: seed {breaking[0]} breaks same-state: uffdgrpc session replay {path} --schedule-seed {breaking[0]}");
            return 1;
        }
        return 0;
    }

    private static SessionJournal? Load(string path)
    {
        try
        {
            return SessionJournal.Load(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidDataException)
        {
            Console.Error.WriteLine($"session: {path}: {e.Message}");
            return null;
        }
    }

    /// <summary>Runs <paramref name="fn"/> with a client of <paramref name="url"/>, or of the real services hosted in-process on a loopback port when null.</summary>
    internal static Task<T> WithServerAsync<T>(string? url, Func<UffdClient, Task<T>> fn) =>
        InProcessServer.WithUrlAsync(url, async address =>
        {
            using var client = url is null ? new UffdClient(address) : CliCommands.Connect(address);
            return await fn(client).ConfigureAwait(false);
        });
}
