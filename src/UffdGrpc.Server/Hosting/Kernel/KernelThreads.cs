using Google.Protobuf;
using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using UffdGrpc.Server.Security;
using Model = UffdGrpc.Mm;
using ThreadState = UffdGrpc.Contracts.V1.ThreadState;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>The threads of kernel-backed address spaces (pthreads of the helper) and their accesses: Access, StartOp, WaitOp and the completions.</summary>
public sealed partial class KernelBackend
{
    /// <summary>StartOp results of each machine's kernel-backed threads not yet drained, by machine id (each list is its own lock).</summary>
    private readonly System.Collections.Concurrent.ConcurrentDictionary<long, List<ThreadOpResult>> _completions = new();

    private List<ThreadOpResult> CompletionsOf(MachineHost host) => _completions.GetOrAdd(host.Id, _ => []);

    internal async Task<CreateThreadResponse> CreateThread(CreateThreadRequest request)
    {
        var mm = Get<KernelMmEntry>(request.MmId, "mm_id");
        lock (mm.Gate)
            Quotas.Check(mm.Threads.Count, Limits.ThreadsPerMachine, nameof(LimitOptions.ThreadsPerMachine), $"kernel-backed address space {mm.Id}");
        var r = await CallAsync(mm, HelperOp.Thread, []).ConfigureAwait(false);
        if (r.Err != 0)
            throw Quotas.Exhausted(nameof(LimitOptions.ThreadsPerMachine), Limits.ThreadsPerMachine, $"kernel-backed address space {mm.Id}", $"the helper could not start a thread: errno {r.Err}");
        var t = _registry.Add(id => new KernelThreadEntry(id, mm.Host, mm, r.R[0], (int)r.R[1]));
        lock (mm.Gate)
            mm.Threads.Add(t);
        return new CreateThreadResponse { Thread = ThreadInfo(t) };
    }

    /// <summary>The thread's state: idle, or (an access in progress) what the kernel says it sleeps in (/proc/PID/task/TID/wchan).</summary>
    internal static ThreadInfo ThreadInfo(KernelThreadEntry t)
    {
        var mm = t.Mm;
        long op;
        lock (mm.Gate)
            op = t.OpId;
        var state = ThreadState.Idle;
        if (mm.Exited || mm.Broken is not null)
        {
            state = ThreadState.Exited;
        }
        else if (op != 0)
        {
            string wchan;
            try
            {
                wchan = File.ReadAllText($"/proc/{mm.Helper.Pid}/task/{t.Tid}/wchan");
            }
            catch (IOException)
            {
                wchan = "";
            }
            state = wchan switch
            {
                "handle_userfault" => ThreadState.BlockedInUserfault,
                "userfaultfd_event_wait_completion" => ThreadState.BlockedOnEvent,
                _ => ThreadState.Running,
            };
        }
        return new ThreadInfo { ThreadId = t.Id, Tid = t.Tid, MmId = mm.Id, State = state, OpId = state == ThreadState.Exited ? 0 : op };
    }

    internal GetThreadResponse GetThread(GetThreadRequest request) => new() { Thread = ThreadInfo(_registry.Get<KernelThreadEntry>(request.ThreadId, "thread_id")) };

    internal ListThreadsResponse ListThreads(ListThreadsRequest request)
    {
        var mm = _registry.Get<KernelMmEntry>(request.MmId, "mm_id");
        List<KernelThreadEntry> threads;
        lock (mm.Gate)
            threads = [.. mm.Threads];
        var (page, next) = Paging.Take(threads, t => t.Id, request.PageSize, request.PageToken);
        var r = new ListThreadsResponse { NextPageToken = next };
        r.Threads.AddRange(page.Select(ThreadInfo));
        return r;
    }

    /// <summary>Checks an access and the arguments the helper takes for it: [span, count, value] and the data to write.</summary>
    private static (ulong Span, ulong N, ulong Value, ReadOnlyMemory<byte> Data) AccessArgs(KernelMmEntry mm, AccessOp? a, string field)
    {
        if (a is null)
            throw RequestErrors.Invalid(field, "required");
        if (a.Origin is not (AccessOrigin.Unspecified or AccessOrigin.User))
            throw RequestErrors.Precondition("KERNEL_BACKED", $"Access with origin {a.Origin} is not served on kernel-backed address space {mm.Id} (user accesses only)");
        (ulong Span, ulong N, ulong Value, ReadOnlyMemory<byte> Data) r;
        switch (a.FormCase)
        {
            case AccessOp.FormOneofCase.Span:
                r = (1, a.Write ? (ulong)a.Span.Data.Length : a.Span.Length, 0, a.Write ? a.Span.Data.Memory : default);
                RequestErrors.Require(r.N <= MaxSpanBytes, field + ".span", $"at most {MaxSpanBytes} bytes");
                break;
            case AccessOp.FormOneofCase.Touch:
                r = (0, a.Touch.Pages == 0 ? 1 : a.Touch.Pages, a.Touch.Value, default);
                RequestErrors.Require(r.N <= ProtoMapping.MaxPagesPerRequest, field + ".touch.pages", $"at most {ProtoMapping.MaxPagesPerRequest}");
                RequestErrors.Require(a.Touch.Value <= 255, field + ".touch.value", "a byte (0-255)");
                break;
            default:
                throw RequestErrors.Invalid(field + ".form", "touch or span is required");
        }
        CheckRange(mm, a.Addr, r.Span == 1 ? r.N : r.N * Model.Kernel.PageSize, field + ".addr");
        return r;
    }

    /// <summary>
    /// Starts an access on the helper's thread: it reads or writes the real memory byte by
    /// byte in address order, as the model does; a fault on a registered range sleeps in
    /// handle_userfault until a handler resolves it; a signal ends the access with its code.
    /// The operation's result completes when the access ends: aborted when the address space
    /// was destroyed first, UNAVAILABLE when its machine or the server went, MM_BROKEN when
    /// the helper died. A logged one (StartOp) goes to the machine's kernel completions too.
    /// </summary>
    private KernelOpEntry StartAccess(KernelThreadEntry t, AccessOp a, bool logged, string field)
    {
        var mm = t.Mm;
        var (span, n, value, data) = AccessArgs(mm, a, field);
        var op = _registry.Add(id => new KernelOpEntry(id, mm.Host, mm, logged));
        var completions = CompletionsOf(mm.Host);
        int logCount;
        lock (completions)
            logCount = completions.Count;
        lock (mm.Gate)
        {
            if (t.OpId != 0 || (logged && logCount >= Limits.CompletionLogPerMachine))
            {
                _registry.Remove(op);
                if (t.OpId != 0)
                    throw RequestErrors.Precondition("THREAD_BUSY", $"thread {t.Id} is running operation {t.OpId}");
                throw Quotas.Exhausted(nameof(LimitOptions.CompletionLogPerMachine), Limits.CompletionLogPerMachine, $"machine {mm.Host.Id}", $"{nameof(LimitOptions.CompletionLogPerMachine)}: machine {mm.Host.Id} already holds {logCount} kernel-backed results (the limit is {Limits.CompletionLogPerMachine})");
            }
            t.OpId = op.Id;
        }
        var call = mm.Helper.CallAsync(HelperOp.Access, [t.Handle, a.Addr, a.Write ? 1UL : 0, span, n, value], data);
        _ = call.ContinueWith(
            c =>
            {
                lock (mm.Gate)
                {
                    if (t.OpId == op.Id)
                        t.OpId = 0;
                }
                try
                {
                    var r = AccessResult(t, op, a, span, n, c);
                    if (logged)
                    {
                        lock (completions)
                            completions.Add(r);
                    }
                    else
                    {
                        _registry.Remove(op);
                    }
                    op.Result.TrySetResult(r);
                }
                catch (RpcException ex)
                {
                    _registry.Remove(op);
                    op.Result.TrySetException(ex);
                }
            },
            CancellationToken.None,
            TaskContinuationOptions.ExecuteSynchronously,
            TaskScheduler.Default);
        return op;
    }

    /// <summary>The result of an ended access, as the model reports one.</summary>
    private ThreadOpResult AccessResult(KernelThreadEntry t, KernelOpEntry op, AccessOp a, ulong span, ulong n, Task<HelperReply> call)
    {
        var mm = t.Mm;
        var result = new ThreadOpResult { OpId = op.Id, ThreadId = t.Id };
        if (call.Exception?.InnerException is HelperGoneException ex)
        {
            if (_registry.Unusable(mm.Host) is { } gone)
                throw gone;
            if (mm.Exited)
            {
                result.Aborted = true;
                return result;
            }
            throw Unusable(mm) ?? RequestErrors.Precondition("MM_BROKEN", $"kernel-backed address space {mm.Id} is broken: {ex.Message}");
        }
        var r = call.Result;
        result.Signal = r.R[0] switch
        {
            0 => SignalCode.Unspecified,
            1 => SignalCode.SegvMaperr,
            2 => SignalCode.SegvAccerr,
            3 => SignalCode.BusAdrerr,
            4 => SignalCode.BusMceerrAr,
            _ => throw new RpcException(new Status(StatusCode.Internal, "the access ended in a signal the API has no code for")),
        };
        // The values as the model gives them: one byte per page (touch) or per byte (a span
        // read), those the access did not reach left 0; a span write gives its data.
        var values = new byte[n];
        r.Data.AsSpan(0, Math.Min(r.Data.Length, values.Length)).CopyTo(values);
        if (span == 1)
        {
            result.DoneBytes = r.R[1];
            result.Values = a.Write ? a.Span.Data : ByteString.CopyFrom(values);
        }
        else
        {
            result.Done = (uint)r.R[1];
            result.Values = ByteString.CopyFrom(values);
        }
        return result;
    }

    internal async Task<AccessResponse> Access(AccessRequest request, ServerCallContext context)
    {
        var t = Get<KernelThreadEntry>(request.ThreadId, "thread_id");
        var op = StartAccess(t, request.Access, logged: false, "access");
        return new AccessResponse { Result = await op.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false) };
    }

    /// <summary>StartOp of an access (the only operation a kernel-backed thread starts): its result goes to WaitOp or TakeCompletions.</summary>
    internal StartOpResponse StartOp(StartOpRequest request)
    {
        var t = Get<KernelThreadEntry>(request.ThreadId, "thread_id");
        if (request.Op is null)
            throw RequestErrors.Invalid("op", "required");
        if (request.Op.OpCase != ThreadOp.OpOneofCase.Access)
            throw RequestErrors.Precondition("KERNEL_BACKED", $"StartOp of {request.Op.OpCase} is not served on kernel-backed address space {t.Mm.Id} (accesses only)");
        var op = StartAccess(t, request.Op.Access, logged: true, "op.access");
        return new StartOpResponse { OpId = op.Id, State = ThreadInfo(t).State };
    }

    internal async Task<WaitOpResponse> WaitOp(WaitOpRequest request, ServerCallContext context)
    {
        var op = _registry.Get<KernelOpEntry>(request.OpId, "op_id");
        var r = await op.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        Forget(op);
        return new WaitOpResponse { Result = r };
    }

    /// <summary>Forgets a waited-for operation: its id becomes unknown and it leaves the completions.</summary>
    private void Forget(KernelOpEntry op)
    {
        _registry.Remove(op);
        var list = CompletionsOf(op.Host);
        lock (list)
            list.RemoveAll(r => r.OpId == op.Id);
    }

    /// <summary>Drains the kernel-backed completions of <paramref name="host"/> (TakeCompletions gives them after the model's); the drained operations are forgotten.</summary>
    internal List<ThreadOpResult> TakeCompletions(MachineHost host)
    {
        var list = CompletionsOf(host);
        List<ThreadOpResult> taken;
        lock (list)
        {
            taken = [.. list];
            list.Clear();
        }
        foreach (var r in taken)
        {
            if (_registry.TryGet<KernelOpEntry>(r.OpId, out var op))
                _registry.Remove(op);
        }
        return taken;
    }

    /// <summary>The longest span one kernel-backed Access reads or writes.</summary>
    private const ulong MaxSpanBytes = 16 << 20;
}

/// <summary>An operation (an access) in progress or ended on a kernel-backed thread: its id is the result's op_id.</summary>
public sealed class KernelOpEntry(long id, MachineHost host, KernelMmEntry mm, bool logged) : KernelEntry(id, host, mm)
{
    /// <summary>Its result also goes to the machine's completions (StartOp).</summary>
    public bool Logged { get; } = logged;
    internal TaskCompletionSource<ThreadOpResult> Result { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
}
