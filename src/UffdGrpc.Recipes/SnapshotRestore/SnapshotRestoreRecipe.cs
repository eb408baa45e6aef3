using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes.SnapshotRestore;

/// <summary>
/// Firecracker's snapshot restore with a UFFD memory backend. The guest's memory is a fresh
/// anonymous region registered MISSING with UFFD_FEATURE_EVENT_REMOVE; the handler copies
/// each faulting page from the snapshot memfd by offset, answers pages the balloon released
/// (MADV_DONTNEED → UFFD_EVENT_REMOVE) with ZEROPAGE, and drains queued events before
/// serving, so a REMOVE read after its PAGEFAULT still wins (firecracker#4990, #5021).
/// <para>Roles: <c>source</c> (the paused VM: its memory written into a memfd, then sealed),
/// <c>guest</c> (the restored VM: vCPU threads and a balloon), <c>handler</c>
/// (<see cref="SnapshotHandler"/>).</para>
/// <para>Variants (<c>--set variant=</c>): <c>unregister</c> unregisters the snapshot's
/// known-zero ranges and every removed range so the kernel fills them (e2b-dev/infra#2974);
/// <c>minor-clones</c> restores N clones (<c>--set clones=N</c>) of the one memfd with MINOR +
/// CONTINUE beside N clones restored with COPY and reports the distinct frames each set holds
/// (ejc3/fcvm#721, cloud-hypervisor#8514).</para>
/// <para>Check: the guest's memory equals the snapshot with the balloon's releases zeroed and
/// the guest's writes on top, byte for byte, every page present (the guest ends with a pass
/// reading all its memory).</para>
/// </summary>
public sealed partial class SnapshotRestoreRecipe : Recipe
{
    public const ulong Base = 0x7f20_0000_0000;
    private const int MadvDontneed = 4;

    public override string Name => "snapshot-restore";
    public override string Description => "Firecracker snapshot restore: a MISSING+EVENT_REMOVE guest served from a snapshot memfd, balloon releases answered with ZEROPAGE; variants: unregister, minor-clones.";
    public override IReadOnlyList<string> Roles { get; } = ["source", "guest", "handler"];

    public override IReadOnlyDictionary<string, string> WrongHandlers { get; } = new Dictionary<string, string>
    {
        ["in-order"] = "handles messages in the order read: a PAGEFAULT read before the REMOVE for its page (the kernel hands out faults first) is served from the snapshot",
    };

    /// <summary>The run's shape, from the options.</summary>
    private sealed record Shape(int Pages, int Vcpus, string Variant, int Clones)
    {
        public ulong Len => (ulong)Pages * PageCheck.PageSize;
        /// <summary>Balloon ranges (first page, pages): a quarter and three quarters in, 1/16 of memory each.</summary>
        public (int First, int Count) Balloon1 => (Pages / 4, Pages / 16);
        public (int First, int Count) Balloon2 => (Pages * 3 / 4, Pages / 16);
        public ulong At(int page) => Base + ((ulong)page * PageCheck.PageSize);

        public static Shape Of(RecipeOptions o)
        {
            var variant = o.Setting("variant", "plain");
            if (variant is not ("plain" or "unregister" or "minor-clones"))
                throw new ArgumentException($"snapshot-restore: variant is plain, unregister or minor-clones, not {variant}");
            var pages = o.Pages > 0 ? o.Pages : variant == "minor-clones" ? 128 : 256;
            var vcpus = int.Parse(o.Setting("vcpus", "2"), CultureInfo.InvariantCulture);
            if (pages < 64 || pages % (16 * vcpus) != 0)
                throw new ArgumentException("snapshot-restore: --pages is at least 64 and a multiple of 16 × vCPUs");
            return new Shape(pages, vcpus, variant, int.Parse(o.Setting("clones", "3"), CultureInfo.InvariantCulture));
        }
    }

    private static string S(long v) => v.ToString(CultureInfo.InvariantCulture);

    public override async Task<RecipeSetup> SetupAsync(RecipeContext ctx, CancellationToken ct)
    {
        var c = ctx.Client;
        var shape = Shape.Of(ctx.Options);
        var machine = (await c.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        var setup = new RecipeSetup(machine);
        // memfd_create + ftruncate: the snapshot's memory file.
        var file = await c.CreateFileAsync(machine, "snapshot-memory", shmem: true, shape.Len, ct).ConfigureAwait(false);
        setup.State["file"] = S(file.FileId);
        setup.State["pages"] = S(shape.Pages);
        setup.State["vcpus"] = S(shape.Vcpus);
        setup.State["variant"] = shape.Variant;
        if (shape.Variant == "minor-clones")
        {
            setup.State["clones"] = S(shape.Clones);
            for (var i = 0; i < shape.Clones; i++)
            {
                // A MINOR clone maps the sealed memfd privately (a sealed memfd allows no
                // writable shared mapping): reads share its page-cache pages, writes COW.
                var (mm, uffd) = await RestoredVmAsync(c, machine, shape.Len, fileId: file.FileId, mode: 4, features: 0, ct).ConfigureAwait(false);
                setup.State[$"minor.{i}.mm"] = S(mm);
                setup.State[$"minor.{i}.uffd"] = S(uffd);
                (mm, uffd) = await RestoredVmAsync(c, machine, shape.Len, fileId: 0, mode: 1, features: 0, ct).ConfigureAwait(false);
                setup.State[$"copy.{i}.mm"] = S(mm);
                setup.State[$"copy.{i}.uffd"] = S(uffd);
            }
        }
        else
        {
            var (mm, uffd) = await RestoredVmAsync(c, machine, shape.Len, fileId: 0, mode: 1, features: 0x8, ct).ConfigureAwait(false);
            setup.State["guest"] = S(mm);
            setup.State["uffd"] = S(uffd);
        }
        return setup;
    }

    /// <summary>Firecracker's restore of guest memory before it hands the uffd to the handler: the region mapped, a userfaultfd with <paramref name="features"/>, the region registered (1 MISSING, 4 MINOR).</summary>
    private static async Task<(long Mm, long Uffd)> RestoredVmAsync(UffdClient c, long machine, ulong len, long fileId, ulong mode, ulong features, CancellationToken ct)
    {
        var mm = await c.CreateMmAsync(machine, ct).ConfigureAwait(false);
        (await c.MmapAsync(mm, Base, len, 3, shared: false, fileId: fileId, readOnlyFd: fileId != 0, ct: ct).ConfigureAwait(false)).Expect("mmap of guest memory");
        var (e, uffd) = await c.CreateUffdAsync(mm, ct: ct).ConfigureAwait(false);
        e.Expect("userfaultfd");
        (await c.ApiAsync(uffd, features, ct: ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_API");
        (await c.RegisterAsync(uffd, Base, len, mode, ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_REGISTER");
        return (mm, uffd);
    }

    public override Task RunRoleAsync(string role, RoleContext ctx, CancellationToken ct) => role switch
    {
        "source" => SourceAsync(ctx, ct),
        "guest" => ctx.State["variant"] == "minor-clones" ? ClonesGuestAsync(ctx, ct) : GuestAsync(ctx, ct),
        "handler" => ctx.State["variant"] == "minor-clones" ? ClonesHandlerAsync(ctx, ct) : HandlerAsync(ctx, ct),
        _ => throw new ArgumentException($"snapshot-restore has no role {role}", nameof(role)),
    };

    /// <summary>The source role: the paused VM's memory written into the memfd through a shared mapping; the VM then exits and the memfd is sealed.</summary>
    private static async Task SourceAsync(RoleContext ctx, CancellationToken ct)
    {
        var c = ctx.Client;
        var shape = Shape.Of(ctx.Options);
        var mm = await c.CreateMmAsync(ctx.MachineId, ct).ConfigureAwait(false);
        (await c.MmapAsync(mm, Base, shape.Len, 3, shared: true, fileId: ctx.Id("file"), ct: ct).ConfigureAwait(false)).Expect("mmap of the memfd (source)");
        var t = (await c.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId;
        (await c.WriteBytesAsync(t, Base, SnapshotContents.Create(shape.Pages, ctx.Options.Seed), ct: ct).ConfigureAwait(false)).Errno.Expect("writing the snapshot");
        await c.DestroyMmAsync(mm, ct).ConfigureAwait(false);
        ctx.Report.Set("snapshot-pages", shape.Pages);
        await ctx.SignalAsync("snapshot").ConfigureAwait(false);
    }

    /// <summary>What the handler (and the check) read of the snapshot: the memfd mapped shared and read-only in a process of their own.</summary>
    internal static async Task<byte[]> ReadSnapshotAsync(UffdClient c, long machine, long fileId, ulong len, CancellationToken ct)
    {
        var mm = await c.CreateMmAsync(machine, ct).ConfigureAwait(false);
        try
        {
            (await c.MmapAsync(mm, Base, len, 1, shared: true, fileId: fileId, readOnlyFd: true, ct: ct).ConfigureAwait(false)).Expect("mmap of the memfd (reader)");
            var t = (await c.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId;
            var r = await c.ReadBytesAsync(t, Base, len, ct: ct).ConfigureAwait(false);
            r.Errno.Expect("reading the snapshot");
            return r.Values.ToByteArray();
        }
        finally
        {
            await c.DestroyMmAsync(mm, CancellationToken.None).ConfigureAwait(false);
        }
    }

    /// <summary>The handler role: waits for the sealed snapshot and for the uffd (handed over once the vCPUs run), serves until the guest is done.</summary>
    private static async Task HandlerAsync(RoleContext ctx, CancellationToken ct)
    {
        var shape = Shape.Of(ctx.Options);
        await ctx.WaitAsync("snapshot", ct).ConfigureAwait(false);
        var snapshot = await ReadSnapshotAsync(ctx.Client, ctx.MachineId, ctx.Id("file"), shape.Len, ct).ConfigureAwait(false);
        await ctx.WaitAsync("vcpus-running", ct).ConfigureAwait(false);
        var kind = ctx.WrongHandler == "in-order" ? SnapshotHandlerKind.InOrder : shape.Variant == "unregister" ? SnapshotHandlerKind.Unregister : SnapshotHandlerKind.Firecracker;
        var handler = new SnapshotHandler(ctx.Client, ctx.Id("uffd"), Base, snapshot, kind);
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var done = ctx.WaitAsync("guest-done", ct).ContinueWith(_ => stop.Cancel(), TaskScheduler.Default);
        await handler.RunAsync(stop.Token).ConfigureAwait(false);
        handler.Stats.ReportTo(ctx.Report);
    }

    /// <summary>
    /// The guest role. (A) Firecracker resumes the vCPUs before the handler reads the uffd:
    /// each vCPU faults on a page (vCPU 0 on one holding data inside the first balloon range)
    /// and the balloon releases that range, so the handler's first read holds PAGEFAULT
    /// before REMOVE for the same page. (B) The vCPUs read and write (server-side workloads,
    /// never in the released range). (C) The balloon releases a second range and the vCPUs use it again. (D) One
    /// pass reads all of memory.
    /// </summary>
    private static async Task GuestAsync(RoleContext ctx, CancellationToken ct)
    {
        try
        {
            var c = ctx.Client;
            var shape = Shape.Of(ctx.Options);
            var mm = ctx.Id("guest");
            await ctx.WaitAsync("snapshot", ct).ConfigureAwait(false);
            var (b1, n1) = shape.Balloon1;
            var (b2, n2) = shape.Balloon2;
            var ops = new List<long>();
            for (var v = 0; v < shape.Vcpus; v++)
            {
                var page = v == 0 ? Enumerable.Range(b1, n1).First(p => !SnapshotContents.IsZero(p)) : b1 + n1 + v;
                var t = (await c.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId;
                ops.Add((await c.StartOpAsync(t, new ThreadOp { Access = UffdClient.Touch(shape.At(page), write: false) }, ct).ConfigureAwait(false)).OpId);
            }
            var balloon = (await c.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId;
            ops.Add((await c.StartOpAsync(balloon, new ThreadOp { Madvise = new MadviseOp { Start = shape.At(b1), Len = (ulong)n1 * PageCheck.PageSize, Advice = MadvDontneed } }, ct).ConfigureAwait(false)).OpId);
            await ctx.SignalAsync("vcpus-running").ConfigureAwait(false);
            using (var bound = CancellationTokenSource.CreateLinkedTokenSource(ct))
            {
                bound.CancelAfter(ctx.Options.Stall * 4);
                foreach (var op in ops)
                {
                    var r = await c.WaitOpAsync(op, bound.Token).ConfigureAwait(false);
                    if (r.Signal != SignalCode.Unspecified || !r.Errno.IsOk())
                        throw new InvalidOperationException($"phase A operation {op}: {r.Signal} {r.Errno.Name()}");
                }
            }
            IGuest guest = new WorkloadGuest(ctx.Client);
            // (B) one vCPU below the released range, one above it (the balloon keeps its pages).
            var runs = await Task.WhenAll(
                guest.RunAsync(new GuestPlan(mm, Base, b1) { Ops = b1, WriteRatio = 0.5, Seed = ctx.Options.Seed, Stall = ctx.Options.Stall }, ct),
                guest.RunAsync(new GuestPlan(mm, shape.At(b1 + n1), shape.Pages - b1 - n1) { Ops = shape.Pages - b1 - n1, WriteRatio = 0.5, Seed = ctx.Options.Seed + 1, Stall = ctx.Options.Stall }, ct)).ConfigureAwait(false);
            Report(ctx.Report, "b", runs[0], 0);
            Report(ctx.Report, "b", runs[1], b1 + n1);
            (await c.MadviseAsync(mm, shape.At(b2), (ulong)n2 * PageCheck.PageSize, MadvDontneed, balloon, ct).ConfigureAwait(false)).Expect("balloon MADV_DONTNEED");
            var runC = await guest.RunAsync(new GuestPlan(mm, shape.At(b2), n2) { Threads = shape.Vcpus, Ops = n2 / shape.Vcpus, WriteRatio = 0.3, Seed = ctx.Options.Seed + 2, Stall = ctx.Options.Stall }, ct).ConfigureAwait(false);
            Report(ctx.Report, "c", runC, b2);
            var runD = await guest.RunAsync(new GuestPlan(mm, Base, shape.Pages) { Ops = shape.Pages, WriteRatio = 0, Pattern = AccessPattern.Sequential, Stall = ctx.Options.Stall }, ct).ConfigureAwait(false);
            Report(ctx.Report, "d", runD, 0);
        }
        finally
        {
            await ctx.SignalAsync("guest-done").ConfigureAwait(false);
        }
    }

    /// <summary>A guest phase into the report: progress, a stall, and (private) the last generation each page got.</summary>
    private static void Report(RoleReport r, string phase, GuestRun run, int firstPage)
    {
        r.Add("guest-accesses-planned", run.Planned);
        r.Add("guest-accesses-done", run.Done);
        if (run.Stalled is { } s)
            r.Note($"phase {phase}: {s}");
        if (run.BlocktimeNs >= 0)
            r.Add("guest-blocktime-us", run.BlocktimeNs / 1000);
        if (run.Userfaults >= 0)
            r.Add("guest-userfaults", run.Userfaults);
        foreach (var w in run.Writes.OrderBy(w => w.Order))
            r.Set(LastWriteKey(phase, firstPage + w.Page), w.Generation);
    }

    private static string LastWriteKey(string phase, int page) => $"_{phase}.last-write.{page.ToString(CultureInfo.InvariantCulture)}";

    public override async Task<RecipeCheck> CheckAsync(RecipeContext ctx, RecipeSetup setup, RoleReport report, CancellationToken ct)
    {
        var shape = Shape.Of(ctx.Options);
        var planned = report.Get("guest-accesses-planned");
        var done = report.Get("guest-accesses-done");
        var snapshot = await ReadSnapshotAsync(ctx.Client, setup.MachineId, long.Parse(setup.State["file"], CultureInfo.InvariantCulture), shape.Len, ct).ConfigureAwait(false);
        if (shape.Variant == "minor-clones")
            return await CheckClonesAsync(ctx, setup, report, shape, snapshot, ct).ConfigureAwait(false);
        // The snapshot, the first release zeroed, phase B's writes, the second release zeroed, phase C's writes.
        var expected = new PageImage[shape.Pages];
        for (var p = 0; p < shape.Pages; p++)
            expected[p] = Image(snapshot.AsSpan(p * (int)PageCheck.PageSize, (int)PageCheck.PageSize));
        Zero(expected, shape.Balloon1);
        Apply(expected, report, "b", shape.Pages);
        Zero(expected, shape.Balloon2);
        Apply(expected, report, "c", shape.Pages);
        var actual = await PageCheck.ImagesAsync(ctx.Client, long.Parse(setup.State["guest"], CultureInfo.InvariantCulture), Base, shape.Pages, ct).ConfigureAwait(false);
        var bytes = PageCheck.Compare("guest memory vs the snapshot with the balloon's releases and the guest's writes", Base, expected, actual, requirePresent: true);
        if (planned == 0 || done < planned)
            return RecipeCheck.Fail($"the guest completed {done} of {planned} accesses; {bytes}");
        return bytes;
    }

    private static PageImage Image(ReadOnlySpan<byte> page) => new(PageState.Present, PageCheck.Sha(page));

    private static void Zero(PageImage[] pages, (int First, int Count) range)
    {
        var zero = Image(new byte[PageCheck.PageSize]);
        for (var p = range.First; p < range.First + range.Count; p++)
            pages[p] = zero;
    }

    private static void Apply(PageImage[] pages, RoleReport report, string phase, int count)
    {
        for (var p = 0; p < count; p++)
        {
            var key = LastWriteKey(phase, p);
            if (report.Has(key))
            {
                pages[p] = Image(WorkloadPages.Expected(Base + ((ulong)p * PageCheck.PageSize), (ulong)report.Get(key)));
            }
        }
    }
}
