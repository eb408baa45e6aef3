using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using UffdGrpc.Server.Security;
using Model = UffdGrpc.Mm;

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
}
