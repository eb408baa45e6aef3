using Google.Protobuf;
using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using UffdGrpc.Server.Security;
using Model = UffdGrpc.Mm;
using ThreadState = UffdGrpc.Contracts.V1.ThreadState;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>
/// The RPCs served on a kernel-backed address space: each request is validated as the model's
/// service validates it, then performed by the helper as the real syscall or ioctl; kernel
/// outcomes come back as OK results with the errno and the result fields as the kernel left
/// them (mapped to the wire as for the model, <see cref="ProtoMapping"/>).
/// </summary>
public sealed partial class KernelBackend
{
    /// <summary>The value the helper puts in an ioctl's result field before the call (kuffd's UNTOUCHED_SENTINEL): still there means the kernel did not write it.</summary>
    private const long Untouched = 0x7eadbeef;

    private static Errno E(int err) => (Errno)err;

    private static long? Field(ulong v) => (long)v == Untouched ? null : (long)v;

    /// <summary>
    /// A range a call passes to the kernel must stay clear of the helper's own mappings (its
    /// code, heap, stacks and libraries lie above <see cref="KernelHelper.OwnLow"/>): a range
    /// that reaches them is refused before anything runs.
    /// </summary>
    private static void CheckRange(KernelMmEntry mm, ulong start, ulong len, string field)
    {
        if (len == 0 || start >= Model.Kernel.TaskSize)
            return;
        var end = len > ulong.MaxValue - start ? ulong.MaxValue : start + len;
        if (end > mm.Helper.OwnLow)
            throw RequestErrors.Invalid(field, $"a kernel-backed address space uses addresses below 0x{mm.Helper.OwnLow:x} (the helper's own mappings lie above)");
    }

    /// <summary>Runs one helper call; a helper that is gone gives the address space's status.</summary>
    private static async Task<HelperReply> CallAsync(KernelMmEntry mm, HelperOp op, ulong[] args, ReadOnlyMemory<byte> data = default)
    {
        try
        {
            return await mm.Helper.CallAsync(op, args, data).ConfigureAwait(false);
        }
        catch (HelperGoneException ex)
        {
            throw Unusable(mm) ?? RequestErrors.Precondition("MM_BROKEN", $"kernel-backed address space {mm.Id} is broken: {ex.Message}");
        }
    }

    internal MmInfo Info(KernelMmEntry mm)
    {
        var info = new MmInfo { MmId = mm.Id, MachineId = mm.Host.Id, Exited = mm.Exited || mm.Broken is not null, Backend = MmBackend.Kernel };
        lock (mm.Gate)
            info.ThreadIds.AddRange(mm.Threads.Select(t => t.Id).Order());
        return info;
    }

    internal async Task<CreateMmResponse> CreateMm(CreateMmRequest request, ServerCallContext context)
    {
        var host = _registry.Machine(request.MachineId);
        var mm = await CreateAsync(host, context.CancellationToken).ConfigureAwait(false);
        return new CreateMmResponse { Mm = Info(mm) };
    }

    internal GetMmResponse GetMm(GetMmRequest request) => new() { Mm = Info(_registry.Get<KernelMmEntry>(request.MmId, "mm_id")) };

    internal DestroyMmResponse DestroyMm(DestroyMmRequest request)
    {
        Destroy(_registry.Get<KernelMmEntry>(request.MmId, "mm_id"));
        return new DestroyMmResponse();
    }

    internal async Task<MmapResponse> Mmap(MmapRequest request)
    {
        var mm = Get<KernelMmEntry>(request.MmId, "mm_id");
        var prot = (ulong)ProtoMapping.ToProt(request.Prot);
        if (request.FileId != 0 || request.ReadOnlyFd || request.Offset != 0)
            throw RequestErrors.Precondition("KERNEL_BACKED", $"Mmap of a file is not served on kernel-backed address space {mm.Id} (anonymous mappings only)");
        CheckRange(mm, request.Addr, request.Len, "addr");
        await mm.MapGate.WaitAsync().ConfigureAwait(false);
        try
        {
            var mapped = mm.MappedBytes;
            if (request.Len > (ulong)Limits.KernelMmBytes || mapped + request.Len > (ulong)Limits.KernelMmBytes)
                throw Quotas.Exhausted(nameof(LimitOptions.KernelMmBytes), Limits.KernelMmBytes, $"kernel-backed address space {mm.Id}", $"{nameof(LimitOptions.KernelMmBytes)}: kernel-backed address space {mm.Id} maps {mapped} bytes; {request.Len} more would pass the limit of {Limits.KernelMmBytes}");
            var r = await CallAsync(mm, HelperOp.Mmap, [request.Addr, request.Len, prot, request.Shared ? 1UL : 0, request.Populate ? 1UL : 0]).ConfigureAwait(false);
            if (r.Err == 0)
            {
                var len = (request.Len + Model.Kernel.PageSize - 1) & ~(Model.Kernel.PageSize - 1);
                lock (mm.Gate)
                    mm.Track(request.Addr, request.Addr + len, mapped: true);
            }
            return new MmapResponse { Errno = E(r.Err), Addr = r.Err == 0 ? request.Addr : 0 };
        }
        finally
        {
            mm.MapGate.Release();
        }
    }

    internal async Task<MunmapResponse> Munmap(MunmapRequest request)
    {
        var mm = Get<KernelMmEntry>(request.MmId, "mm_id");
        CheckThread(mm, request.ThreadId);
        CheckRange(mm, request.Start, request.Len, "start");
        await mm.MapGate.WaitAsync().ConfigureAwait(false);
        try
        {
            var r = await CallAsync(mm, HelperOp.Munmap, [request.Start, request.Len]).ConfigureAwait(false);
            if (r.Err == 0)
            {
                var len = (request.Len + Model.Kernel.PageSize - 1) & ~(Model.Kernel.PageSize - 1);
                lock (mm.Gate)
                    mm.Track(request.Start, request.Start + len, mapped: false);
            }
            return new MunmapResponse { Errno = E(r.Err), ThreadId = request.ThreadId };
        }
        finally
        {
            mm.MapGate.Release();
        }
    }

    internal async Task<MprotectResponse> Mprotect(MprotectRequest request)
    {
        var mm = Get<KernelMmEntry>(request.MmId, "mm_id");
        var prot = (ulong)ProtoMapping.ToProt(request.Prot);
        CheckRange(mm, request.Start, request.Len, "start");
        var r = await CallAsync(mm, HelperOp.Mprotect, [request.Start, request.Len, prot]).ConfigureAwait(false);
        return new MprotectResponse { Errno = E(r.Err) };
    }

    internal async Task<MadviseResponse> Madvise(MadviseRequest request)
    {
        var mm = Get<KernelMmEntry>(request.MmId, "mm_id");
        var advice = (ulong)(int)ProtoMapping.ToAdvice(request.Advice);
        CheckThread(mm, request.ThreadId);
        CheckRange(mm, request.Start, request.Len, "start");
        var r = await CallAsync(mm, HelperOp.Madvise, [request.Start, request.Len, advice]).ConfigureAwait(false);
        return new MadviseResponse { Errno = E(r.Err), ThreadId = request.ThreadId };
    }

    /// <summary>A syscall's thread_id, when given, must be a thread of the address space (the helper runs the call on its own thread).</summary>
    private void CheckThread(KernelMmEntry mm, long threadId)
    {
        if (threadId != 0 && Get<KernelThreadEntry>(threadId, "thread_id").Mm != mm)
            throw RequestErrors.Invalid("thread_id", "the thread belongs to another process");
    }

    internal async Task<PagemapResponse> Pagemap(PagemapRequest request)
    {
        var mm = Get<KernelMmEntry>(request.MmId, "mm_id");
        RequestErrors.Require(request.Pages <= ProtoMapping.MaxPagesPerRequest, "pages", $"at most {ProtoMapping.MaxPagesPerRequest}");
        RequestErrors.Require(request.Start <= Model.Kernel.TaskSize && (ulong)request.Pages * Model.Kernel.PageSize <= Model.Kernel.TaskSize - request.Start, "start", "the range must lie below TASK_SIZE");
        var r = await CallAsync(mm, HelperOp.Pagemap, [request.Start, request.Pages]).ConfigureAwait(false);
        if (r.Err != 0)
            throw new RpcException(new Status(StatusCode.Internal, $"reading the helper's /proc/self/pagemap failed: errno {r.Err}"));
        var response = new PagemapResponse();
        for (var i = 0; i < (int)request.Pages; i++)
        {
            var a = request.Start + ((ulong)i * Model.Kernel.PageSize);
            response.Entries.Add(ProtoMapping.ToPagemap(a, BitConverter.ToUInt64(r.Data, i * 8)));
        }
        return response;
    }

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

    /// <summary>
    /// Access: the helper's thread reads or writes the real memory, byte by byte in address
    /// order as the model does; a fault on a registered range sleeps in handle_userfault until
    /// a handler resolves it; a signal ends the access with its code. The call ends aborted
    /// when the address space is destroyed first.
    /// </summary>
    internal async Task<AccessResponse> Access(AccessRequest request, ServerCallContext context)
    {
        var t = Get<KernelThreadEntry>(request.ThreadId, "thread_id");
        var mm = t.Mm;
        var a = request.Access ?? throw RequestErrors.Invalid("access", "required");
        if (a.Origin is not (AccessOrigin.Unspecified or AccessOrigin.User))
            throw RequestErrors.Precondition("KERNEL_BACKED", $"Access with origin {a.Origin} is not served on kernel-backed address space {mm.Id} (user accesses only)");
        ulong span, n, value = 0;
        ReadOnlyMemory<byte> data = default;
        switch (a.FormCase)
        {
            case AccessOp.FormOneofCase.Span:
                span = 1;
                n = a.Write ? (ulong)a.Span.Data.Length : a.Span.Length;
                RequestErrors.Require(n <= MaxSpanBytes, "access.span", $"at most {MaxSpanBytes} bytes");
                data = a.Write ? a.Span.Data.Memory : default;
                break;
            case AccessOp.FormOneofCase.Touch:
                span = 0;
                n = a.Touch.Pages == 0 ? 1 : a.Touch.Pages;
                RequestErrors.Require(n <= ProtoMapping.MaxPagesPerRequest, "access.touch.pages", $"at most {ProtoMapping.MaxPagesPerRequest}");
                RequestErrors.Require(a.Touch.Value <= 255, "access.touch.value", "a byte (0-255)");
                value = a.Touch.Value;
                break;
            default:
                throw RequestErrors.Invalid("access.form", "touch or span is required");
        }
        CheckRange(mm, a.Addr, span == 1 ? n : n * Model.Kernel.PageSize, "access.addr");
        var op = _registry.Add(id => new KernelOpEntry(id, mm.Host, mm));
        lock (mm.Gate)
        {
            if (t.OpId != 0)
            {
                _registry.Remove(op);
                throw RequestErrors.Precondition("THREAD_BUSY", $"thread {t.Id} is running operation {t.OpId}");
            }
            t.OpId = op.Id;
        }
        var call = mm.Helper.CallAsync(HelperOp.Access, [t.Handle, a.Addr, a.Write ? 1UL : 0, span, n, value], data);
        // The thread is free again when its access ends, whether or not the caller still waits.
        _ = call.ContinueWith(
            _ =>
            {
                lock (mm.Gate)
                {
                    if (t.OpId == op.Id)
                        t.OpId = 0;
                }
                _registry.Remove(op);
            },
            CancellationToken.None,
            TaskContinuationOptions.ExecuteSynchronously,
            TaskScheduler.Default);
        var result = new ThreadOpResult { OpId = op.Id, ThreadId = t.Id };
        HelperReply r;
        try
        {
            r = await call.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        }
        catch (HelperGoneException ex)
        {
            if (_registry.Unusable(mm.Host) is { } gone)
                throw gone;
            if (mm.Exited)
            {
                result.Aborted = true;
                return new AccessResponse { Result = result };
            }
            throw Unusable(mm) ?? RequestErrors.Precondition("MM_BROKEN", $"kernel-backed address space {mm.Id} is broken: {ex.Message}");
        }
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
        return new AccessResponse { Result = result };
    }

    /// <summary>The longest span one kernel-backed Access reads or writes.</summary>
    private const ulong MaxSpanBytes = 16 << 20;
}

/// <summary>An access in progress on a kernel-backed thread (its id is the result's op_id).</summary>
public sealed class KernelOpEntry(long id, MachineHost host, KernelMmEntry mm) : KernelEntry(id, host, mm);
