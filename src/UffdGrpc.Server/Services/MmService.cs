using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>Address spaces: the memory syscalls, files, and the /proc views.</summary>
public sealed class MmService(MachineRegistry registry) : Contracts.V1.Mm.MmBase
{
    private const ulong PageSize = Model.Kernel.PageSize;

    private static MmInfo Info(MmEntry e) => e.Host.Kernel.Locked(() =>
    {
        var info = new MmInfo { MmId = e.Id, MachineId = e.Host.Id, Exited = e.Mm.Exited, VmaCount = e.Mm.Vmas.Count };
        info.ThreadIds.AddRange(e.Host.ThreadIds.Where(p => p.Key.Mm == e.Mm).Select(p => p.Value).Order());
        return info;
    });

    public override Task<MmInfo> CreateMm(CreateMmRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var id = h.Run(() => registry.IdOf(h, h.Kernel.CreateMm()));
        return Task.FromResult(Info(registry.Mm(id)));
    }

    public override Task<ListMmsResponse> ListMms(ListMmsRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var ids = h.Kernel.Locked(() => h.MmIds.Values.Order().ToList());
        var r = new ListMmsResponse();
        r.Mms.AddRange(ids.Select(id => Info(registry.Mm(id))));
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
        return Task.FromResult(ErrnoStatus.Check(errno, new MmapResponse { Addr = errno == Model.Errno.OK ? request.Addr : 0 }, "mmap"));
    }

    public override Task<MprotectResponse> Mprotect(MprotectRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var prot = ProtoMapping.ToProt(request.Prot);
        var errno = e.Host.Run(() => e.Mm.Mprotect(request.Start, request.Len, prot));
        return Task.FromResult(ErrnoStatus.Check(errno, new MprotectResponse(), "mprotect"));
    }

    public override Task<ClearRefsResponse> ClearRefs(ClearRefsRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        RequestErrors.Require(request.Value.Length <= 32, "value", "at most 32 characters");
        var errno = e.Host.Run(() => e.Mm.ClearRefs(request.Value));
        return Task.FromResult(ErrnoStatus.Check(errno, new ClearRefsResponse(), "clear_refs"));
    }

    /// <summary>The thread a parking syscall runs on: the given one (of this process) or a fresh one.</summary>
    private ThreadEntry SyscallThread(MmEntry e, long threadId)
    {
        if (threadId == 0)
            return registry.Thread(e.Host.Run(() => registry.IdOf(e.Host, e.Host.Kernel.CreateThread(e.Mm))));
        var t = registry.Thread(threadId);
        if (t.MmId != e.Id)
            throw RequestErrors.Invalid("thread_id", "the thread belongs to another process");
        return t;
    }

    private async Task<ThreadOpResult> RunSyscallAsync(MmEntry e, long threadId, Model.SyscallOp op, ServerCallContext context)
    {
        var t = SyscallThread(e, threadId);
        var entry = registry.Start(t, op, logged: false);
        return await entry.Result.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
    }

    private static SyscallResponse Done(ThreadOpResult r, string what)
    {
        if (r.Aborted)
            throw ErrnoStatus.ToException(Model.Errno.EINTR, null, what + " (the thread was killed)");
        return ErrnoStatus.Check((Model.Errno)r.Errno.Number, new SyscallResponse { ThreadId = r.ThreadId }, what);
    }

    public override async Task<SyscallResponse> Munmap(MunmapRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        return Done(await RunSyscallAsync(e, request.ThreadId, new Model.MunmapOp(request.Start, request.Len), context).ConfigureAwait(false), "munmap");
    }

    public override async Task<SyscallResponse> Mremap(MremapRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        return Done(await RunSyscallAsync(e, request.ThreadId, new Model.MremapOp(request.OldAddr, request.Len, request.NewAddr), context).ConfigureAwait(false), "mremap");
    }

    public override async Task<SyscallResponse> Madvise(MadviseRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var op = Model.MadviseOp.Create(request.Start, request.Len, ProtoMapping.ToAdvice(request.Advice));
        return Done(await RunSyscallAsync(e, request.ThreadId, op, context).ConfigureAwait(false), "madvise");
    }

    public override async Task<ForkResponse> Fork(ForkRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var r = await RunSyscallAsync(e, request.ThreadId, new Model.ForkOp(), context).ConfigureAwait(false);
        if (r.Aborted)
            throw ErrnoStatus.ToException(Model.Errno.EINTR, null, "fork (the thread was killed)");
        return new ForkResponse { ChildMmId = r.ChildMmId, ChildThreadId = r.ChildThreadId, ChildTid = r.ChildTid };
    }

    public override Task<Contracts.V1.FileInfo> CreateFile(CreateFileRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        RequestErrors.Require(request.Name.Length <= 255, "name", "at most 255 characters (NAME_MAX)");
        RequestErrors.Require(request.Size <= (1UL << 40), "size", "at most 1 TiB");
        var id = h.Run(() => registry.IdOf(h, h.Kernel.CreateFile(request.Name, request.Shmem, request.Size)));
        var f = registry.File(id).File;
        return Task.FromResult(new Contracts.V1.FileInfo { FileId = id, Name = f.Name, Shmem = f.IsShmem, Size = f.Size });
    }

    public override Task<ListVmasResponse> ListVmas(ListVmasRequest request, ServerCallContext context)
    {
        var e = registry.Mm(request.MmId);
        var r = new ListVmasResponse();
        e.Host.Kernel.Locked(() =>
        {
            foreach (var v in e.Mm.Vmas)
            {
                var view = new VmaView
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
        var res = e.Host.Run(() => e.Mm.PagemapScan(arg));
        var r = new PagemapScanResponse { WalkEnd = res.WalkEnd };
        r.Regions.AddRange(res.Regions.Select(g => new Contracts.V1.PageRegion { Start = g.Start, End = g.End, Categories = g.Categories }));
        return Task.FromResult(ErrnoStatus.Check(res.Errno, r, "PAGEMAP_SCAN"));
    }
}
