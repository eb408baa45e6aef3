using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>Address spaces: the memory syscalls, files, and the /proc views.</summary>
public sealed class MmService(MachineRegistry registry) : Contracts.V1.MmService.MmServiceBase
{
    private const ulong PageSize = Model.Kernel.PageSize;

    internal static MmInfo Info(MmEntry e) => e.Host.Kernel.Locked(() =>
    {
        var info = new MmInfo { MmId = e.Id, MachineId = e.Host.Id, Exited = e.Mm.Exited, VmaCount = e.Mm.Vmas.Count, BlocktimeNs = (long)(e.Mm.Blocktime.Ticks * 100), Backend = MmBackend.Model };
        info.ThreadIds.AddRange(e.Host.ThreadIds.Where(p => p.Key.Mm == e.Mm).Select(p => p.Value).Order());
        return info;
    });

    public override Task<CreateMmResponse> CreateMm(CreateMmRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var id = h.Run(() =>
        {
            Security.Quotas.Check(h.Kernel.Mms.Count, registry.Quotas.Limits.MmsPerMachine, nameof(Security.LimitOptions.MmsPerMachine), $"machine {h.Id}");
            return registry.IdOf(h, h.Kernel.CreateMm());
        });
        return Task.FromResult(new CreateMmResponse { Mm = Info(registry.Mm(id)) });
    }

    public override Task<GetMmResponse> GetMm(GetMmRequest request, ServerCallContext context) =>
        Task.FromResult(new GetMmResponse { Mm = Info(registry.Mm(request.MmId)) });

    public override Task<ListMmsResponse> ListMms(ListMmsRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var ids = h.Kernel.Locked(() => h.MmIds.Values.Order().ToList());
        var (page, next) = Paging.Take(ids, id => id, request.PageSize, request.PageToken);
        var r = new ListMmsResponse { NextPageToken = next };
        r.Mms.AddRange(page.Select(id => Info(registry.Mm(id))));
        return Task.FromResult(r);
    }

    public override Task<DestroyMmResponse> DestroyMm(DestroyMmRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        e.Host.Run(e.Mm.Exit);
        return Task.FromResult(new DestroyMmResponse());
    }

    public override Task<MmapResponse> Mmap(MmapRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var prot = ProtoMapping.ToProt(request.Prot);
        var file = request.FileId == 0 ? null : registry.File(request.FileId);
        if (file is not null && file.Host != e.Host)
            throw RequestErrors.Invalid("file_id", "the file belongs to another machine");
        var errno = e.Host.Run(() => e.Mm.Mmap(request.Addr, request.Len, prot, request.Shared, file?.File, request.Offset, request.ReadOnlyFd, request.Populate));
        return Task.FromResult(new MmapResponse { Errno = ProtoMapping.ToProto(errno), Addr = errno == Model.Errno.OK ? request.Addr : 0 });
    }

    public override Task<MprotectResponse> Mprotect(MprotectRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var prot = ProtoMapping.ToProt(request.Prot);
        var errno = e.Host.Run(() => e.Mm.Mprotect(request.Start, request.Len, prot));
        return Task.FromResult(new MprotectResponse { Errno = ProtoMapping.ToProto(errno) });
    }

    public override Task<ClearRefsResponse> ClearRefs(ClearRefsRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        RequestErrors.Require(request.Value.Length <= 32, "value", "at most 32 characters");
        var errno = e.Host.Run(() => e.Mm.ClearRefs(request.Value));
        return Task.FromResult(new ClearRefsResponse { Errno = ProtoMapping.ToProto(errno) });
    }

    /// <summary>The thread a parking syscall runs on: the given one (of this process) or a fresh one.</summary>
    private ThreadEntry SyscallThread(MmEntry e, long threadId)
    {
        if (threadId == 0)
        {
            return registry.Thread(e.Host.Run(() =>
            {
                Security.Quotas.Check(e.Host.LiveThreads, registry.Quotas.Limits.ThreadsPerMachine, nameof(Security.LimitOptions.ThreadsPerMachine), $"machine {e.Host.Id}");
                return registry.IdOf(e.Host, e.Host.Kernel.CreateThread(e.Mm));
            }));
        }
        var t = registry.Thread(threadId);
        if (t.MmId != e.Id)
            throw RequestErrors.Invalid("thread_id", "the thread belongs to another process");
        return t;
    }

    private async Task<ThreadOpResult> RunSyscallAsync(MmEntry e, long threadId, Func<ThreadEntry, Model.SyscallOp> make, ServerCallContext context)
    {
        var t = SyscallThread(e, threadId);
        var entry = registry.Start(t, make(t), logged: false);
        var r = await entry.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        // The thread died before the call returned: the kernel has no return value to give.
        if (r.Aborted)
            throw new RpcException(new Status(StatusCode.Aborted, $"thread {t.Id} was killed before the call returned"));
        return r;
    }

    public override async Task<MunmapResponse> Munmap(MunmapRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var r = await RunSyscallAsync(e, request.ThreadId, _ => new Model.MunmapOp(request.Start, request.Len), context).ConfigureAwait(false);
        return new MunmapResponse { Errno = r.Errno, ThreadId = r.ThreadId };
    }

    public override async Task<MremapResponse> Mremap(MremapRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var r = await RunSyscallAsync(e, request.ThreadId, _ => new Model.MremapOp(request.OldAddr, request.Len, request.NewAddr), context).ConfigureAwait(false);
        return new MremapResponse { Errno = r.Errno, ThreadId = r.ThreadId };
    }

    public override async Task<MadviseResponse> Madvise(MadviseRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var advice = ProtoMapping.ToAdvice(request.Advice);
        var r = await RunSyscallAsync(e, request.ThreadId, _ => Model.MadviseOp.Create(request.Start, request.Len, advice), context).ConfigureAwait(false);
        return new MadviseResponse { Errno = r.Errno, ThreadId = r.ThreadId };
    }

    public override async Task<ForkResponse> Fork(ForkRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var r = await RunSyscallAsync(e, request.ThreadId, _ => new Model.ForkOp(), context).ConfigureAwait(false);
        return new ForkResponse { Errno = r.Errno, ThreadId = r.ThreadId, ChildMmId = r.ChildMmId, ChildThreadId = r.ChildThreadId, ChildTid = r.ChildTid };
    }

    public override async Task<ProcessVmReadvResponse> ProcessVmReadv(ProcessVmReadvRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var op = new ProcessVmOp { RemoteMmId = request.RemoteMmId, Write = false, Flags = request.Flags, LocalIov = { request.LocalIov }, RemoteIov = { request.RemoteIov } };
        var r = await RunSyscallAsync(e, request.ThreadId, t => ProtoMapping.ToModel(op, registry, t), context).ConfigureAwait(false);
        return new ProcessVmReadvResponse { Errno = r.Errno, Transferred = r.Transferred, ThreadId = r.ThreadId };
    }

    public override async Task<ProcessVmWritevResponse> ProcessVmWritev(ProcessVmWritevRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var op = new ProcessVmOp { RemoteMmId = request.RemoteMmId, Write = true, Flags = request.Flags, LocalIov = { request.LocalIov }, RemoteIov = { request.RemoteIov } };
        var r = await RunSyscallAsync(e, request.ThreadId, t => ProtoMapping.ToModel(op, registry, t), context).ConfigureAwait(false);
        return new ProcessVmWritevResponse { Errno = r.Errno, Transferred = r.Transferred, ThreadId = r.ThreadId };
    }

    public override Task<CreateFileResponse> CreateFile(CreateFileRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        RequestErrors.Require(request.Name.Length <= 255, "name", "at most 255 characters (NAME_MAX)");
        RequestErrors.Require(request.Size <= (1UL << 40), "size", "at most 1 TiB");
        var id = h.Run(() =>
        {
            Security.Quotas.Check(h.FileIds.Count, registry.Quotas.Limits.FilesPerMachine, nameof(Security.LimitOptions.FilesPerMachine), $"machine {h.Id}");
            return registry.IdOf(h, h.Kernel.CreateFile(request.Name, request.Shmem, request.Size));
        });
        var f = registry.File(id).File;
        return Task.FromResult(new CreateFileResponse { File = new Contracts.V1.FileInfo { FileId = id, Name = f.Name, Shmem = f.IsShmem, Size = f.Size } });
    }

    public override Task<ListVmasResponse> ListVmas(ListVmasRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var r = new ListVmasResponse();
        RequestErrors.Require(request.PageSize is >= 0 and <= Paging.MaxSize, "page_size", $"0 (the default, {Paging.DefaultSize}) to {Paging.MaxSize}");
        ulong after = 0;
        if (request.PageToken.Length > 0 && !ulong.TryParse(request.PageToken, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out after))
            throw RequestErrors.Invalid("page_token", "not a token this list returned");
        var size = request.PageSize == 0 ? Paging.DefaultSize : request.PageSize;
        e.Host.Kernel.Locked(() =>
        {
            // VMAs are listed by address; the token is the end of the last one listed.
            foreach (var v in e.Mm.Vmas)
            {
                if (v.End <= after)
                    continue;
                if (r.Vmas.Count == size)
                {
                    r.NextPageToken = r.Vmas[^1].End.ToString(System.Globalization.CultureInfo.InvariantCulture);
                    break;
                }
                var view = new VmaInfo
                {
                    Start = v.Start,
                    End = v.End,
                    Perms = v.PermString,
                    VmFlags = (ulong)v.Flags,
                    FileId = v.File is null ? 0 : registry.IdOf(e.Host, v.File),
                    Pgoff = v.PgOff,
                    UffdId = v.UffdCtx is null ? 0 : registry.IdOf(e.Host, v.UffdCtx),
                };
                view.Flags.AddRange(ProtoMapping.VmFlagNames(v.Flags));
                r.Vmas.Add(view);
            }
        });
        return Task.FromResult(r);
    }

    private static void CheckRange(ulong start, ulong len)
    {
        RequestErrors.Require(len / PageSize <= ProtoMapping.MaxPagesPerRequest, "len", $"at most {ProtoMapping.MaxPagesPerRequest} pages per request");
        RequestErrors.Require(start <= Model.Kernel.TaskSize && len <= Model.Kernel.TaskSize - start, "start", "the range must lie below TASK_SIZE");
    }

    public override Task<DumpPageTableResponse> DumpPageTable(DumpPageTableRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        CheckRange(request.Start, request.Len);
        var r = new DumpPageTableResponse();
        e.Host.Kernel.Locked(() =>
        {
            var pt = e.Mm.PageTable;
            var end = request.Start + request.Len;
            for (var a = request.Start & ~(PageSize - 1); a < end;)
            {
                var slotEnd = (a & Model.Kernel.PmdMask) + Model.Kernel.PmdSize;
                var pmdt = pt.PmdTableOf(a, false);
                var pmd = pmdt?.Entries[Model.PageTable.PmdIndex(a)] ?? default;
                if (!pmd.IsNone)
                {
                    r.Entries.Add(ProtoMapping.ToProto(a & Model.Kernel.PmdMask, pmd));
                    a = slotEnd;
                    continue;
                }
                var table = pmdt?.Tables[Model.PageTable.PmdIndex(a)];
                if (table is null)
                {
                    a = slotEnd;
                    continue;
                }
                for (; a < Math.Min(slotEnd, end); a += PageSize)
                {
                    var pte = table.Entries[Model.PageTable.PteIndex(a)];
                    if (!pte.IsNone)
                        r.Entries.Add(ProtoMapping.ToProto(a, pte));
                }
            }
        });
        return Task.FromResult(r);
    }

    public override Task<PagemapResponse> Pagemap(PagemapRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        RequestErrors.Require(request.Pages <= ProtoMapping.MaxPagesPerRequest, "pages", $"at most {ProtoMapping.MaxPagesPerRequest}");
        CheckRange(request.Start, (ulong)request.Pages * PageSize);
        var r = new PagemapResponse();
        e.Host.Kernel.Locked(() =>
        {
            for (var i = 0UL; i < request.Pages; i++)
            {
                var a = request.Start + (i * PageSize);
                r.Entries.Add(ProtoMapping.ToPagemap(a, e.Mm.PagemapEntry(a)));
            }
        });
        return Task.FromResult(r);
    }

    public override Task<SmapsResponse> Smaps(SmapsRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var r = new SmapsResponse();
        foreach (var s in e.Host.Kernel.Locked(() => e.Mm.Smaps(request.Start, request.End)))
        {
            r.Entries.Add(new Contracts.V1.SmapsEntry
            {
                Start = s.Start,
                End = s.End,
                Perms = s.Perms,
                VmFlags = (ulong)s.Flags,
                RssPages = s.RssPages,
                SwapPages = s.SwapPages,
                PmdMapped = s.PmdMapped,
            });
        }
        return Task.FromResult(r);
    }

    public override Task<PagemapScanResponse> PagemapScan(PagemapScanRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var arg = new Model.PmScanArg
        {
            Flags = request.Flags,
            Start = request.Start,
            End = request.End,
            VecLen = request.VecLen,
            MaxPages = request.MaxPages,
            CategoryInverted = request.CategoryInverted,
            CategoryMask = request.CategoryMask,
            CategoryAnyofMask = request.CategoryAnyofMask,
            ReturnMask = request.ReturnMask,
        };
        RequestErrors.Require(request.VecLen <= ProtoMapping.MaxPagesPerRequest, "vec_len", $"at most {ProtoMapping.MaxPagesPerRequest} regions");
        var (res, seq) = e.Host.Run(() => (e.Mm.PagemapScan(arg), e.Host.Kernel.WriteSeq));
        var r = new PagemapScanResponse { Errno = ProtoMapping.ToProto(res.Errno), WalkEnd = res.WalkEnd, Count = res.Errno == Model.Errno.OK ? res.Regions.Count : 0, MachineSeq = seq };
        r.Regions.AddRange(res.Regions.Select(g => new Contracts.V1.PageRegion { Start = g.Start, End = g.End, Categories = g.Categories }));
        return Task.FromResult(r);
    }

    /// <summary>The most pages one Digest call covers.</summary>
    public const uint MaxDigestPages = 65536;

    public override Task<DigestResponse> Digest(DigestRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        RequestErrors.Require(request.Start % PageSize == 0, "start", "page-aligned");
        RequestErrors.Require(request.Pages <= MaxDigestPages, "pages", $"at most {MaxDigestPages}");
        CheckRange(request.Start, (ulong)request.Pages * PageSize);
        var n = (int)request.Pages;
        var states = new Model.PageContentState[n];
        var hashes = new byte[n * Model.Mm.DigestSize];
        e.Host.Run(() => e.Mm.Digest(request.Start, (ulong)n, states, hashes));
        var r = new DigestResponse();
        for (var i = 0; i < n; i++)
        {
            var state = ProtoMapping.ToProto(states[i]);
            var hasContents = state is PageState.Present or PageState.Swapped or PageState.NotPresent or PageState.PageCache;
            r.Pages.Add(new PageDigest
            {
                State = state,
                Sha256 = hasContents ? Google.Protobuf.ByteString.CopyFrom(hashes, i * Model.Mm.DigestSize, Model.Mm.DigestSize) : Google.Protobuf.ByteString.Empty,
            });
        }
        return Task.FromResult(r);
    }

    /// <summary>The largest image ImportMm accepts, and the chunk size ExportMm streams.</summary>
    public const int MaxImageBytes = 1 << 30;
    private const int ChunkBytes = 1 << 20;

    public override async Task ExportMm(ExportMmRequest request, IServerStreamWriter<ExportMmResponse> responseStream, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var bytes = Google.Protobuf.MessageExtensions.ToByteArray(e.Host.Run(() => MmImages.Export(e.Mm)));
        // At least one chunk, so an empty address space still sends its (empty) image.
        var off = 0;
        do
        {
            var n = Math.Min(ChunkBytes, bytes.Length - off);
            await responseStream.WriteAsync(new ExportMmResponse { Chunk = Google.Protobuf.ByteString.CopyFrom(bytes, off, n) }, context.CancellationToken).ConfigureAwait(false);
            off += n;
        }
        while (off < bytes.Length);
    }

    public override async Task<ImportMmResponse> ImportMm(IAsyncStreamReader<ImportMmRequest> requestStream, ServerCallContext context)
    {
        long machineId = 0;
        using var buffer = new MemoryStream();
        while (await requestStream.MoveNext(context.CancellationToken).ConfigureAwait(false))
        {
            var r = requestStream.Current;
            if (machineId == 0)
                machineId = r.MachineId;
            else
                RequestErrors.Require(r.MachineId == 0 || r.MachineId == machineId, "machine_id", "the first message's, or 0");
            RequestErrors.Require(buffer.Length + r.Chunk.Length <= MaxImageBytes, "chunk", $"an image of at most {MaxImageBytes} bytes");
            r.Chunk.WriteTo(buffer);
        }
        var h = registry.Machine(machineId);
        if (h.Journal is not null)
            throw RequestErrors.Precondition("JOURNALED", $"machine {h.Id} keeps a session journal, which has no step for an image import");
        MmImage image;
        try
        {
            image = MmImage.Parser.ParseFrom(buffer.GetBuffer(), 0, (int)buffer.Length);
        }
        catch (Google.Protobuf.InvalidProtocolBufferException ex)
        {
            throw RequestErrors.Invalid("chunk", "not a serialized MmImage: " + ex.Message);
        }
        MmImages.Validate(image);
        var (mmId, uffdIds) = h.Run(() =>
        {
            Security.Quotas.Check(h.Kernel.Mms.Count, registry.Quotas.Limits.MmsPerMachine, nameof(Security.LimitOptions.MmsPerMachine), $"machine {h.Id}");
            var (errno, mm, ctxs) = MmImages.Import(h.Kernel, image);
            if (mm is null)
                throw RequestErrors.Precondition("IMPORT_FAILED", $"restoring the image failed with {errno} (nothing was kept)");
            return (registry.IdOf(h, mm), ctxs.Select(c => registry.IdOf(h, c)).ToList());
        });
        var response = new ImportMmResponse { Mm = Info(registry.Mm(mmId)) };
        response.UffdIds.AddRange(uffdIds);
        return response;
    }
}
