using Google.Protobuf;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>
/// Address-space images (MmImage, format version 1): export reads what a checkpoint tool
/// reads (VMAs, pages, files, uffd-wp bits, registrations); import restores it by replaying
/// the syscalls a restore tool makes, so the model's rules apply to the result as to any
/// other process.
/// </summary>
internal static class MmImages
{
    public const uint Version = 1;

    /// <summary>The image of <paramref name="mm"/>. Caller holds the machine lock.</summary>
    public static MmImage Export(Model.Mm mm)
    {
        var image = new MmImage { Version = Version };
        var files = new Dictionary<Model.MemFile, uint>();
        var uffds = new Dictionary<Model.UserfaultfdCtx, uint>();
        foreach (var v in mm.Snapshot())
        {
            var f = v.Flags;
            var vi = new VmaImage
            {
                Start = v.Start,
                End = v.End,
                Prot = (uint)(f & Model.VmFlags.AccessFlags),
                Shared = (f & Model.VmFlags.MayShare) != 0,
                ReadOnlyFd = (f & Model.VmFlags.MayShare) != 0 && (f & Model.VmFlags.MayWrite) == 0,
                Hugepage = (f & Model.VmFlags.HugePage) != 0,
                Nohugepage = (f & Model.VmFlags.NoHugePage) != 0,
                UffdMode = ((f & Model.VmFlags.UffdMissing) != 0 ? 1UL : 0) | ((f & Model.VmFlags.UffdWp) != 0 ? 2UL : 0) | ((f & Model.VmFlags.UffdMinor) != 0 ? 4UL : 0),
            };
            if (v.File is { } file)
            {
                if (!files.TryGetValue(file, out var fi))
                {
                    image.Files.Add(ExportFile(file));
                    fi = files[file] = (uint)image.Files.Count;
                }
                vi.File = fi;
                vi.Offset = v.PgOff * Model.Kernel.PageSize;
            }
            if (v.Uffd is { Released: false } ctx && vi.UffdMode != 0)
            {
                if (!uffds.TryGetValue(ctx, out var ui))
                {
                    image.Uffds.Add(new UffdImage { Features = (ulong)ctx.Features, Flags = (uint)((ctx.NonBlocking ? Model.Uapi.ONonblock : 0) | (ctx.UserModeOnly ? Model.Uapi.UffdUserModeOnly : 0)) });
                    ui = uffds[ctx] = (uint)image.Uffds.Count;
                }
                vi.Uffd = ui;
            }
            foreach (var (index, data) in v.Pages)
                vi.Pages.Add(new PageImage { Index = index, Data = ByteString.CopyFrom(data) });
            vi.UffdWpPages.AddRange(v.UffdWpPages);
            image.Vmas.Add(vi);
        }
        return image;
    }

    private static FileImage ExportFile(Model.MemFile file)
    {
        var fi = new FileImage { Name = file.Name, Shmem = file.IsShmem, Size = file.Size };
        foreach (var index in file.IndexesWithData())
        {
            if (file.PeekPage(index, out var data) != Model.PageContentState.BeyondEof && data.Span.ContainsAnyExcept((byte)0))
                fi.Pages.Add(new PageImage { Index = index, Data = ByteString.CopyFrom(data.Span) });
        }
        return fi;
    }

    /// <summary>Checks an image before anything is created (a malformed image changes nothing).</summary>
    public static void Validate(MmImage image)
    {
        RequestErrors.Require(image.Version == Version, "image.version", $"version {Version}");
        foreach (var (v, i) in image.Vmas.Select((v, i) => (v, i)))
        {
            var f = $"image.vmas[{i}]";
            RequestErrors.Require(v.Start % Model.Kernel.PageSize == 0 && v.End % Model.Kernel.PageSize == 0 && v.Start < v.End && v.End <= Model.Kernel.TaskSize, f, "a page-aligned range below TASK_SIZE");
            RequestErrors.Require(v.File <= image.Files.Count && v.Uffd <= image.Uffds.Count, f, "file and uffd indexes within the image");
            RequestErrors.Require((v.Prot & ~7u) == 0 && (v.UffdMode & ~7UL) == 0, f, "prot and uffd_mode bits");
            var pages = (v.End - v.Start) / Model.Kernel.PageSize;
            RequestErrors.Require(v.Pages.All(p => p.Index < pages && p.Data.Length == (int)Model.Kernel.PageSize) && v.UffdWpPages.All(p => p < pages), f, "page indexes within the VMA and 4096-byte pages");
        }
        foreach (var (file, i) in image.Files.Select((x, i) => (x, i)))
            RequestErrors.Require(file.Size <= 1UL << 40 && file.Name.Length <= 255 && file.Pages.All(p => p.Data.Length == (int)Model.Kernel.PageSize), $"image.files[{i}]", "a file of at most 1 TiB with 4096-byte pages");
    }

    /// <summary>
    /// Restores <paramref name="image"/> into a new process of machine <paramref name="k"/>: files
    /// (pwrite of their pages), VMAs (mmap, writable while their pages are written, then
    /// mprotect back; MADV_HUGEPAGE/NOHUGEPAGE), then userfaultfds (userfaultfd, UFFDIO_API
    /// with the image's features, UFFDIO_REGISTER per VMA, UFFDIO_WRITEPROTECT of the uffd-wp
    /// pages). Returns the new process and uffds, or the errno of the first call that failed
    /// (the process is then destroyed). Caller holds the machine lock.
    /// </summary>
    public static (Model.Errno Errno, Model.Mm? Mm, List<Model.UserfaultfdCtx> Uffds) Import(Model.Kernel k, MmImage image)
    {
        var mm = k.CreateMm();
        var thread = k.CreateThread(mm);
        var ctxs = new List<Model.UserfaultfdCtx>();
        var errno = Restore(k, mm, thread, image, ctxs);
        if (errno == Model.Errno.OK)
            return (errno, mm, ctxs);
        foreach (var c in ctxs)
            c.Release();
        mm.Exit();
        return (errno, null, []);
    }

    private static Model.Errno Restore(Model.Kernel k, Model.Mm mm, Model.SimThread thread, MmImage image, List<Model.UserfaultfdCtx> ctxs)
    {
        var files = new List<Model.MemFile>();
        foreach (var fi in image.Files)
        {
            var file = k.CreateFile(fi.Name, fi.Shmem, fi.Size);
            files.Add(file);
            foreach (var p in fi.Pages)
            {
                if (mm.PwriteFilePage(file, p.Index, p.Data.Span) is var e and not Model.Errno.OK)
                    return e;
            }
        }
        foreach (var v in image.Vmas)
        {
            var prot = (Model.Prot)v.Prot;
            var file = v.File == 0 ? null : files[(int)v.File - 1];
            var writable = v.Pages.Count > 0 && (prot & Model.Prot.Write) == 0;
            var e = mm.Mmap(v.Start, v.End - v.Start, writable ? prot | Model.Prot.Write | Model.Prot.Read : prot, v.Shared, file, v.Offset, v.ReadOnlyFd);
            if (e != Model.Errno.OK)
                return e;
            foreach (var p in v.Pages)
            {
                var w = Model.BytesAccessOp.Write(v.Start + (p.Index * Model.Kernel.PageSize), p.Data.Memory, Model.AccessOrigin.Kernel);
                k.Start(thread, w);
                if (w.Result != Model.Errno.OK)
                    return w.Result;
            }
            if (writable && mm.Mprotect(v.Start, v.End - v.Start, prot) is var pe and not Model.Errno.OK)
                return pe;
            if (v.Hugepage || v.Nohugepage)
            {
                var op = Model.MadviseOp.Create(v.Start, v.End - v.Start, v.Hugepage ? Model.Madv.Hugepage : Model.Madv.Nohugepage);
                k.Start(thread, op);
                if (op.Result != Model.Errno.OK)
                    return op.Result;
            }
        }
        foreach (var ui in image.Uffds)
        {
            var e = k.Userfaultfd(mm, (int)ui.Flags, out var ctx);
            if (e != Model.Errno.OK)
                return e;
            ctxs.Add(ctx!);
            if (ctx!.Api(Model.Uapi.UffdApi, ui.Features, out _, out _) is var ae and not Model.Errno.OK)
                return ae;
        }
        foreach (var v in image.Vmas.Where(v => v.Uffd != 0))
        {
            var ctx = ctxs[(int)v.Uffd - 1];
            if (ctx.Register(v.Start, v.End - v.Start, v.UffdMode, out _) is var re and not Model.Errno.OK)
                return re;
            // uffd-wp bits only mean something (and only survive) in a WP registration.
            foreach (var p in (v.UffdMode & 2) != 0 ? v.UffdWpPages : [])
            {
                if (ctx.Writeprotect(v.Start + (p * Model.Kernel.PageSize), Model.Kernel.PageSize, 1) is var we and not Model.Errno.OK)
                    return we;
            }
        }
        return Model.Errno.OK;
    }
}
