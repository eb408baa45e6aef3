using System.CommandLine;
using System.Diagnostics;
using UffdGrpc.Recipes;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>recipe NAME</c>: runs a live-migration recipe (see <see cref="RecipeCatalog"/>) against
/// the real services hosted in-process (default) or <c>--server URL</c>; with
/// <c>--processes</c> each role runs as its own OS process (this CLI again, as <c>recipe NAME
/// --role R --server URL --machine ID ...</c>). Prints the check (PASS/FAIL with the first
/// differing page) and the counters; the exit status is 1 when the check fails.
/// </summary>
public static class RecipeCommand
{
    public static Command Build()
    {
        var group = new Command("recipe", "Live-migration recipes: each tool split into its roles, checked byte for byte against its source, with a deliberately wrong handler the check catches.");
        foreach (var r in RecipeCatalog.All)
            group.Subcommands.Add(BuildOne(r));
        return group;
    }

    private static Command BuildOne(Recipe recipe)
    {
        var server = new Option<string?>("--server") { Description = "Run against this server instead of the services hosted in-process" };
        var processes = new Option<bool>("--processes") { Description = "Run each role (" + string.Join(", ", recipe.Roles) + ") as its own OS process" };
        var wrong = new Option<string?>("--wrong-handler") { Description = "Run a deliberately wrong handler: " + string.Join("; ", recipe.WrongHandlers.Select(kv => $"{kv.Key} ({kv.Value})")) };
        var svg = new Option<string?>("--svg") { Description = "Where to write the latency histogram (default artifacts/recipe-NAME.svg)" };
        var seed = new Option<ulong>("--seed") { Description = "The guest's seed (and the interleaving's, where the recipe has one)", DefaultValueFactory = _ => 1 };
        var seeds = new Option<int>("--seeds") { Description = "Run seeds --seed .. --seed+N-1 and report each outcome with its seeds (explore)", DefaultValueFactory = _ => 1 };
        var pages = new Option<int>("--pages") { Description = "Pages in the migrated range (0: the recipe's default)" };
        var stall = new Option<int>("--stall-ms") { Description = "A guest access incomplete for this long ends the run as stalled", DefaultValueFactory = _ => 2000 };
        var set = new Option<string[]>("--set") { Description = "Recipe setting key=value (repeatable)", AllowMultipleArgumentsPerToken = false };
        var roleCommand = new Option<string[]>("--role-command") { Description = "ROLE=COMMAND: with --processes, start ROLE as COMMAND (e.g. handler=\"python3 tools/recipes/postcopy_handler.py\"); it receives the role arguments" };
        // A role process: what the runner passes.
        var role = new Option<string?>("--role") { Description = "Run one role (what --processes starts)", Hidden = true };
        var machine = new Option<long>("--machine") { Hidden = true };
        var state = new Option<string[]>("--state") { Hidden = true };
        var cmd = new Command(recipe.Name, recipe.Description) { server, processes, wrong, svg, seed, seeds, pages, stall, set, roleCommand, role, machine, state };
        cmd.SetAction(async (parse, ct) =>
        {
            var w = parse.GetValue(wrong);
            if (w is not null && !recipe.WrongHandlers.ContainsKey(w))
            {
                await Console.Error.WriteLineAsync($"recipe {recipe.Name}: --wrong-handler is one of {string.Join(", ", recipe.WrongHandlers.Keys)}").ConfigureAwait(false);
                return 2;
            }
            if (Pairs(parse.GetValue(set), "--set") is not { } settings || Pairs(parse.GetValue(roleCommand), "--role-command") is not { } commands)
                return 2;
            var options = new RecipeOptions
            {
                Seed = parse.GetValue(seed),
                Pages = parse.GetValue(pages),
                WrongHandler = w,
                Stall = TimeSpan.FromMilliseconds(parse.GetValue(stall)),
                Settings = settings,
            };
            var url = parse.GetValue(server);
            if (parse.GetValue(role) is { } r)
            {
                if (url is null || Pairs(parse.GetValue(state), "--state") is not { } st)
                    return 2;
                using var client = CliCommands.Connect(url);
                return await RoleProcess.RunAsync(recipe, r, client, parse.GetValue(machine), st, options, ct).ConfigureAwait(false);
            }
            var procs = parse.GetValue(processes);
            var svgPath = parse.GetValue(svg) ?? Path.Combine("artifacts", $"recipe-{recipe.Name}.svg");
            return await CliCommands.GuardAsync("recipe " + recipe.Name, () => WithServerAsync(url, async address =>
            {
                using var client = CliCommands.Connect(address);
                var failed = 0;
                ulong? firstFailing = null;
                var n = Math.Max(1, parse.GetValue(seeds));
                for (var i = 0; i < n; i++)
                {
                    var o = new RecipeOptions { Seed = options.Seed + (ulong)i, Pages = options.Pages, WrongHandler = options.WrongHandler, Stall = options.Stall, Settings = options.Settings };
                    var ctx = new RecipeContext(client, o, TextWriter.Synchronized(Console.Out));
                    var runner = new RecipeRunner(recipe, ctx)
                    {
                        ServerUrl = address,
                        Launch = procs ? (rl, args) => Launcher(recipe, rl, args, commands) : null,
                    };
                    var result = await runner.RunAsync(ct).ConfigureAwait(false);
                    if (!result.Check.Passed)
                        failed++;
                    if (n > 1)
                    {
                        // Exploring seeds: one line each; replay one with --seed.
                        Console.WriteLine($"seed {o.Seed}: {result.Check}");
                        if (!result.Check.Passed && failed == 1)
                            firstFailing = o.Seed;
                        continue;
                    }
                    RecipePrinter.Print(result, o, procs ? "roles as processes" : "roles in one process", Console.Out);
                    if (RecipePrinter.WriteSvg(result, o, svgPath))
                        Console.WriteLine($"latency histogram: {svgPath}");
                }
                if (n > 1)
                {
                    Console.WriteLine($"recipe {recipe.Name}: {n - failed} of {n} seeds passed the check");
                    if (firstFailing is { } f)
                        Console.WriteLine($"  replay the first failing seed: uffdgrpc recipe {recipe.Name}{(w is null ? "" : " --wrong-handler " + w)} --seed {f}");
                }
                return failed == 0 ? 0 : 1;
            })).ConfigureAwait(false);
        });
        return cmd;
    }

    private static Dictionary<string, string>? Pairs(string[]? items, string what)
    {
        var d = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var s in items ?? [])
        {
            var eq = s.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
            {
                Console.Error.WriteLine($"recipe: {what}: expected key=value, got {s}");
                return null;
            }
            d[s[..eq]] = s[(eq + 1)..];
        }
        return d;
    }

    // This CLI again (as `dotnet UffdGrpc.Cli.dll` when it runs that way), or the role's command.
    private static ProcessStartInfo Launcher(Recipe recipe, string role, IReadOnlyList<string> args, Dictionary<string, string> commands)
    {
        ProcessStartInfo psi;
        if (commands.TryGetValue(role, out var command))
        {
            var words = command.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            psi = new ProcessStartInfo(words[0]);
            foreach (var word in words.Skip(1))
                psi.ArgumentList.Add(word);
        }
        else
        {
            var self = Environment.ProcessPath ?? throw new InvalidOperationException("no process path");
            psi = new ProcessStartInfo(self);
            if (Path.GetFileNameWithoutExtension(self) == "dotnet")
                psi.ArgumentList.Add(typeof(RecipeCommand).Assembly.Location);
            psi.ArgumentList.Add("recipe");
            psi.ArgumentList.Add(recipe.Name);
        }
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        return psi;
    }

    /// <summary>Runs <paramref name="fn"/> with the URL of <paramref name="url"/>, or of the real services hosted in-process on a loopback port when null.</summary>
    private static Task<int> WithServerAsync(string? url, Func<string, Task<int>> fn) => InProcessServer.WithUrlAsync(url, fn);
}
