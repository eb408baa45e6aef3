using UffdGrpc.Contracts.V1;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// One simulated machine served over the API: its <see cref="Kernel"/>, the ids of its
/// objects, the log of completed thread operations, and a change signal that wakes event
/// streams.
/// </summary>
/// <remarks>
/// Lock order: <see cref="Model.Kernel.Lock"/>, then <c>_signalGate</c>. The id maps and the
/// completion log are protected by the kernel lock, because the model fills them from
/// completion callbacks that run under it.
/// </remarks>
public sealed class MachineHost(long id, Model.Kernel kernel)
{
    private readonly Lock _signalGate = new();
    private TaskCompletionSource _changed = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public long Id { get; } = id;
    public Model.Kernel Kernel { get; } = kernel;
    public bool Destroyed { get; internal set; }

    /// <summary>The model object → id maps (fork children and FORK uffds get ids when they appear).</summary>
    internal Dictionary<Model.Mm, long> MmIds { get; } = [];
    internal Dictionary<Model.SimThread, long> ThreadIds { get; } = [];
    internal Dictionary<Model.UserfaultfdCtx, long> UffdIds { get; } = [];
    internal Dictionary<Model.MemFile, long> FileIds { get; } = [];
    /// <summary>Results of operations started with StartOp, in completion order.</summary>
    internal List<ThreadOpResult> CompletionLog { get; } = [];

    /// <summary>Completes when the machine's state next changes (see <see cref="Pulse"/>).</summary>
    public Task Changed
    {
        get
        {
            lock (_signalGate)
                return _changed.Task;
        }
    }

    /// <summary>
    /// Signals that an operation ran: event streams retry their read. The model never acts on
    /// its own, so every message is queued inside some RPC, which pulses when it ends.
    /// </summary>
    public void Pulse()
    {
        TaskCompletionSource old;
        lock (_signalGate)
        {
            old = _changed;
            _changed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        }
        old.TrySetResult();
    }

    /// <summary>Runs <paramref name="fn"/> under the machine lock (woken threads run before it is released), then pulses.</summary>
    public T Run<T>(Func<T> fn)
    {
        try
        {
            return Kernel.Locked(fn);
        }
        finally
        {
            Pulse();
        }
    }

    /// <summary>Runs <paramref name="fn"/> under the machine lock, then pulses.</summary>
    public void Run(Action fn)
    {
        try
        {
            Kernel.Locked(fn);
        }
        finally
        {
            Pulse();
        }
    }
}
