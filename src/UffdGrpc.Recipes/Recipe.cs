using UffdGrpc.Client;

namespace UffdGrpc.Recipes;

/// <summary>
/// A live-migration recipe: a tool split into the roles a real one has (source, destination
/// or guest, handler), each a client of the public API that may run in its own OS process.
/// The runner calls <see cref="SetupAsync"/> once (it creates the machine and the state every
/// role needs), runs every role of <see cref="Roles"/> at once, then <see cref="CheckAsync"/>
/// compares the result with its source byte for byte. Roles share nothing but the server,
/// the ids of <see cref="RecipeSetup.State"/> and named signals (<see cref="RoleContext.SignalAsync"/>).
/// </summary>
public abstract class Recipe
{
    /// <summary>The CLI name (<c>uffdgrpc recipe NAME</c>).</summary>
    public abstract string Name { get; }

    /// <summary>One line: what the recipe shows.</summary>
    public abstract string Description { get; }

    /// <summary>The roles, each run at once (in its own process with <c>--processes</c>).</summary>
    public abstract IReadOnlyList<string> Roles { get; }

    /// <summary>The deliberately wrong handlers <c>--wrong-handler</c> accepts, with what each does wrong.</summary>
    public abstract IReadOnlyDictionary<string, string> WrongHandlers { get; }

    /// <summary>Creates the machine and the state the roles need (the ids they receive go into <see cref="RecipeSetup.State"/>).</summary>
    public abstract Task<RecipeSetup> SetupAsync(RecipeContext ctx, CancellationToken ct);

    /// <summary>Runs one role to its end.</summary>
    public abstract Task RunRoleAsync(string role, RoleContext ctx, CancellationToken ct);

    /// <summary>The byte-for-byte check once every role ended (the roles' counters and notes in <paramref name="report"/>).</summary>
    public abstract Task<RecipeCheck> CheckAsync(RecipeContext ctx, RecipeSetup setup, RoleReport report, CancellationToken ct);

    /// <summary>
    /// The two sides of a migration on <paramref name="machine"/>: two processes, each with
    /// [<paramref name="start"/>, +<paramref name="len"/>) mapped private read-write.
    /// </summary>
    protected static async Task<(long A, long B)> TwoMappedProcessesAsync(UffdClient c, long machine, ulong start, ulong len, string aName, string bName, CancellationToken ct)
    {
        var a = await c.CreateMmAsync(machine, ct).ConfigureAwait(false);
        var b = await c.CreateMmAsync(machine, ct).ConfigureAwait(false);
        (await c.MmapAsync(a, start, len, 3, ct: ct).ConfigureAwait(false)).Expect($"mmap ({aName})");
        (await c.MmapAsync(b, start, len, 3, ct: ct).ConfigureAwait(false)).Expect($"mmap ({bName})");
        return (a, b);
    }
}

/// <summary>What a run was asked to do (the CLI's options).</summary>
public sealed class RecipeOptions
{
    /// <summary>The seed of the guest's access pattern (and of the interleaving where a recipe has one). Default 1.</summary>
    public ulong Seed { get; init; } = 1;

    /// <summary>Pages in the migrated range (0: the recipe's default).</summary>
    public int Pages { get; init; }

    /// <summary>The wrong handler to run instead of the correct one (null: the correct one).</summary>
    public string? WrongHandler { get; init; }

    /// <summary>
    /// How long a guest operation may stay incomplete before the guest gives up and reports
    /// the stall (a bounded run: a handler that never resolves a fault is found by the check,
    /// not by a hang). Default 2 s.
    /// </summary>
    public TimeSpan Stall { get; init; } = TimeSpan.FromSeconds(2);

    /// <summary>Recipe-specific settings (<c>--set key=value</c>).</summary>
    public IReadOnlyDictionary<string, string> Settings { get; init; } = new Dictionary<string, string>();

    /// <summary>A recipe setting, or <paramref name="fallback"/>.</summary>
    public string Setting(string key, string fallback) => Settings.TryGetValue(key, out var v) ? v : fallback;
}

/// <summary>The run as the parent (the runner) sees it.</summary>
public sealed class RecipeContext(UffdClient client, RecipeOptions options, TextWriter output)
{
    public UffdClient Client { get; } = client;
    public RecipeOptions Options { get; } = options;
    /// <summary>Where the run prints.</summary>
    public TextWriter Output { get; } = output;
}

/// <summary>
/// What <see cref="Recipe.SetupAsync"/> made: the machine, the ids and values every role
/// receives (<see cref="State"/>, passed to role processes on their command line), and
/// values only the check reads (<see cref="Private"/>, e.g. the digest at the snapshot instant).
/// </summary>
public sealed class RecipeSetup(long machineId)
{
    public long MachineId { get; } = machineId;
    public Dictionary<string, string> State { get; } = new(StringComparer.Ordinal);
    public Dictionary<string, object> Private { get; } = new(StringComparer.Ordinal);
}

/// <summary>The check's verdict: PASS, or FAIL with what differed first.</summary>
public sealed record RecipeCheck(bool Passed, string Detail)
{
    public static RecipeCheck Pass(string detail) => new(true, detail);
    public static RecipeCheck Fail(string detail) => new(false, detail);
    public override string ToString() => (Passed ? "PASS" : "FAIL") + ": " + Detail;
}

/// <summary>What a run found: the check, the roles' counters and notes, the wall time, and the server's migration metrics of the machine.</summary>
public sealed record RecipeResult(string Recipe, string Handler, RecipeCheck Check, RoleReport Report, long MachineId, TimeSpan Elapsed)
{
    /// <summary>The machine's migration metrics once the roles ended (latency histograms, counters, blocktime); null when the server has none.</summary>
    public Contracts.V1.GetMigrationMetricsResponse? Metrics { get; init; }
}
