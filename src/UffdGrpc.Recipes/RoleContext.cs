using System.Collections.Concurrent;
using System.Globalization;
using UffdGrpc.Client;

namespace UffdGrpc.Recipes;

/// <summary>
/// One role's view of a run: the server, the machine, the ids of the setup, the options,
/// named signals shared with the other roles (across processes: through the runner), and
/// the report its counters and notes go to.
/// </summary>
public sealed class RoleContext(UffdClient client, long machineId, IReadOnlyDictionary<string, string> state, RecipeOptions options, ISignalBoard signals, RoleReport report, TextWriter log)
{
    public UffdClient Client { get; } = client;
    public long MachineId { get; } = machineId;
    public IReadOnlyDictionary<string, string> State { get; } = state;
    public RecipeOptions Options { get; } = options;
    public RoleReport Report { get; } = report;
    /// <summary>Free-form progress lines (the terminal).</summary>
    public TextWriter Log { get; } = log;

    /// <summary>
    /// Objects of the setup (<see cref="RecipeSetup.Private"/>) when the role runs in the
    /// runner's own process (a seeded interleaver, a ledger the check reads); null in a role
    /// process.
    /// </summary>
    public IReadOnlyDictionary<string, object>? Shared { get; init; }

    /// <summary>The wrong handler selected, or null.</summary>
    public string? WrongHandler => Options.WrongHandler;

    /// <summary>An id of the setup.</summary>
    public long Id(string key) => long.Parse(State[key], CultureInfo.InvariantCulture);

    /// <summary>A value of the setup.</summary>
    public ulong U64(string key) => ulong.Parse(State[key], CultureInfo.InvariantCulture);

    /// <summary>Raises signal <paramref name="name"/> for every role (once; later raises do nothing).</summary>
    public Task SignalAsync(string name) => signals.RaiseAsync(name);

    /// <summary>Waits until some role raised <paramref name="name"/>.</summary>
    public Task WaitAsync(string name, CancellationToken ct) => signals.WaitAsync(name, ct);

    /// <summary>Whether <paramref name="name"/> was raised.</summary>
    public bool IsRaised(string name) => signals.IsRaised(name);
}

/// <summary>Named one-shot signals between the roles of one run.</summary>
public interface ISignalBoard
{
    Task RaiseAsync(string name);
    Task WaitAsync(string name, CancellationToken ct);
    bool IsRaised(string name);
}

/// <summary>The signals of roles in one process (and the runner's copy of every process's signals).</summary>
public sealed class SignalBoard : ISignalBoard
{
    private readonly ConcurrentDictionary<string, TaskCompletionSource> _signals = new(StringComparer.Ordinal);

    /// <summary>Called with each newly raised signal (the process runner forwards it to the other roles).</summary>
    public Func<string, Task>? OnRaised { get; set; }

    private TaskCompletionSource Get(string name) => _signals.GetOrAdd(name, _ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));

    public async Task RaiseAsync(string name)
    {
        if (Get(name).TrySetResult() && OnRaised is { } f)
            await f(name).ConfigureAwait(false);
    }

    /// <summary>Marks <paramref name="name"/> raised without forwarding it (a signal that came from elsewhere).</summary>
    public void Accept(string name) => Get(name).TrySetResult();

    public Task WaitAsync(string name, CancellationToken ct) => Get(name).Task.WaitAsync(ct);

    public bool IsRaised(string name) => Get(name).Task.IsCompleted;
}

/// <summary>
/// Counters (pages moved, bytes moved, round trips, faults served, ...) and notes (a stalled
/// guest, a lost write) the roles report. Thread-safe; merged across role processes.
/// </summary>
public sealed class RoleReport
{
    private readonly ConcurrentDictionary<string, long> _counters = new(StringComparer.Ordinal);
    private readonly ConcurrentQueue<string> _notes = new();

    /// <summary>Adds <paramref name="n"/> to counter <paramref name="key"/>.</summary>
    public void Add(string key, long n = 1) => _counters.AddOrUpdate(key, n, (_, v) => v + n);

    /// <summary>Sets counter <paramref name="key"/>.</summary>
    public void Set(string key, long n) => _counters[key] = n;

    public long Get(string key) => _counters.TryGetValue(key, out var v) ? v : 0;

    public bool Has(string key) => _counters.ContainsKey(key);

    /// <summary>A finding in words (the first lines of the check's story).</summary>
    public void Note(string text) => _notes.Enqueue(text);

    public IReadOnlyList<string> Notes => [.. _notes];

    /// <summary>The counters in name order.</summary>
    public IReadOnlyList<KeyValuePair<string, long>> Counters => [.. _counters.OrderBy(kv => kv.Key, StringComparer.Ordinal)];

    /// <summary>Adds every counter and note of <paramref name="other"/>.</summary>
    public void Merge(RoleReport other)
    {
        foreach (var (k, v) in other.Counters)
            Add(k, v);
        foreach (var n in other.Notes)
            Note(n);
    }
}
