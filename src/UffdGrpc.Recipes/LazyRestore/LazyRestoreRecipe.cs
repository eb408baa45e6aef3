using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Recipes.SnapshotRestore;

namespace UffdGrpc.Recipes.LazyRestore;

/// <summary>
/// CRIU's lazy restore (<c>criu restore --lazy-pages</c> with <c>criu lazy-pages</c>).
/// <para>Roles: <c>source</c> (a process tree — a root task P and its child Q — dumped into
/// an images directory), <c>restorer</c> (each task rebuilt from its image with its pages
/// left out and its VMAs registered MISSING on a uffd with EVENT_FORK | REMAP | UNMAP |
/// REMOVE, the uffds handed to the daemon), <c>handler</c> (the lazy-pages daemon,
/// <see cref="LazyPagesDaemon"/>, which ends once every page is restored) and <c>guest</c>
/// (the restored tree running: it mremaps, forks a child that exits mid-restore, forks a
/// child that lives, munmaps, releases memory, reads and writes).</para>
/// <para>Check: every task alive at the end equals, VMA for VMA and byte for byte, the same
/// workload run on an eagerly restored copy of the tree (the images with their pages).</para>
/// </summary>
public sealed class LazyRestoreRecipe : Recipe
{
    public const ulong RegionA = 0x5000_0000;
    public const ulong RegionB = 0x6000_0000;
    public const ulong RegionC = 0x7000_0000;
    public const ulong RegionD = 0x8000_0000;
    public const int SmallPages = 64;
    /// <summary>A zero run of 8 pages in every 64 runs: long lazy runs, so the background chunk can grow.</summary>
    private const int ZeroPeriod = 64;
    private const ulong Features = 0x2 | 0x4 | 0x8 | 0x40; // EVENT_FORK | EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP

    public override string Name => "lazy-restore";
    public override string Description => "CRIU lazy restore: a forking, remapping, unmapping process tree served by a criu/uffd.c lazy-pages daemon, checked against an eager restore.";
    public override IReadOnlyList<string> Roles { get; } = ["source", "restorer", "handler", "guest"];

    public override IReadOnlyDictionary<string, string> WrongHandlers { get; } = new Dictionary<string, string>
    {
        ["ignores-remap"] = "reads UFFD_EVENT_REMAP and keeps the moved pages at their old address: a fault at the new one finds no lazy page and gets a zero page",
    };

    private static string S(long v) => v.ToString(CultureInfo.InvariantCulture);

    public override async Task<RecipeSetup> SetupAsync(RecipeContext ctx, CancellationToken ct)
    {
        var machine = (await ctx.Client.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        var setup = new RecipeSetup(machine);
        var dir = Path.Combine(Path.GetTempPath(), $"uffdgrpc-lazy-restore-{Environment.ProcessId}-{machine}");
        Directory.CreateDirectory(dir);
        setup.State["images"] = dir;
        setup.State["pages"] = S(ctx.Options.Pages > 0 ? ctx.Options.Pages : 2048);
        return setup;
    }

    public override Task RunRoleAsync(string role, RoleContext ctx, CancellationToken ct) => role switch
    {
        "source" => DumpAsync(ctx, ct),
        "restorer" => RestorerAsync(ctx, ct),
        "handler" => DaemonAsync(ctx, ct),
        "guest" => GuestAsync(ctx, ct),
        _ => throw new ArgumentException($"lazy-restore has no role {role}", nameof(role)),
    };

    /// <summary>The source role: P with three regions (A with zero runs, B, C), Q forked from P and diverged; both dumped to the images directory.</summary>
    private static async Task DumpAsync(RoleContext ctx, CancellationToken ct)
    {
        var c = ctx.Client;
        var pages = (int)ctx.Id("pages");
        var seed = ctx.Options.Seed;
        var p = await c.CreateMmAsync(ctx.MachineId, ct).ConfigureAwait(false);
        var t = (await c.CreateThreadAsync(p, ct).ConfigureAwait(false)).ThreadId;
        foreach (var (at, n, s) in new (ulong, int, ulong)[] { (RegionA, pages, seed), (RegionB, SmallPages, seed + 1), (RegionC, SmallPages, seed + 2) })
        {
            (await c.MmapAsync(p, at, (ulong)n * PageCheck.PageSize, 3, ct: ct).ConfigureAwait(false)).Expect("mmap (source)");
            await WriteDataPagesAsync(c, t, at, SnapshotContents.Create(n, s, ZeroPeriod), ct).ConfigureAwait(false);
        }
        var fork = await c.ForkAsync(p, t, ct).ConfigureAwait(false);
        fork.Errno.Expect("fork (source)");
        var q = fork.ChildMmId;
        var qt = (await c.CreateThreadAsync(q, ct).ConfigureAwait(false)).ThreadId;
        (await c.MunmapAsync(q, RegionB, RegionC + (SmallPages * PageCheck.PageSize) - RegionB, qt, ct).ConfigureAwait(false)).Expect("munmap (source)");
        await WriteDataPagesAsync(c, qt, RegionA, SnapshotContents.Create(pages / 2, seed + 3, ZeroPeriod), ct).ConfigureAwait(false);
        var dir = ctx.State["images"];
        await File.WriteAllBytesAsync(Path.Combine(dir, "P.img"), await c.ExportMmAsync(p, ct).ConfigureAwait(false), ct).ConfigureAwait(false);
        await File.WriteAllBytesAsync(Path.Combine(dir, "Q.img"), await c.ExportMmAsync(q, ct).ConfigureAwait(false), ct).ConfigureAwait(false);
        await c.DestroyMmAsync(q, ct).ConfigureAwait(false);
        await c.DestroyMmAsync(p, ct).ConfigureAwait(false);
        await ctx.SignalAsync("dumped").ConfigureAwait(false);
    }

    /// <summary>Writes only the pages holding data (the dump then leaves the zero pages out, as CRIU's does).</summary>
    private static async Task WriteDataPagesAsync(UffdClient c, long thread, ulong at, byte[] contents, CancellationToken ct)
    {
        const int page = (int)PageCheck.PageSize;
        var n = contents.Length / page;
        for (var p = 0; p < n;)
        {
            if (!contents.AsSpan(p * page, page).ContainsAnyExcept((byte)0))
            {
                p++;
                continue;
            }
            var end = p;
            while (end < n && contents.AsSpan(end * page, page).ContainsAnyExcept((byte)0))
                end++;
            (await c.WriteBytesAsync(thread, at + ((ulong)p * PageCheck.PageSize), contents.AsMemory(p * page, (end - p) * page), ct: ct).ConfigureAwait(false)).Errno.Expect("write (source)");
            p = end;
        }
    }

    /// <summary>The tasks of the tree, by name.</summary>
    internal static readonly string[] Tasks = ["P", "Q"];

    /// <summary>
    /// The restorer role: each task from its image; lazily, without its pages and with every
    /// VMA registered MISSING on a uffd with the non-cooperative events. The restored ids
    /// go to the daemon and the tasks through the images directory (CRIU hands the uffds
    /// over its lazy-pages socket); "restore finished" follows once the tasks run.
    /// </summary>
    private static async Task RestorerAsync(RoleContext ctx, CancellationToken ct)
    {
        await ctx.WaitAsync("dumped", ct).ConfigureAwait(false);
        var dir = ctx.State["images"];
        var lines = new List<string>();
        foreach (var task in Tasks)
        {
            var (mm, uffd) = await RestoreAsync(ctx.Client, ctx.MachineId, await File.ReadAllBytesAsync(Path.Combine(dir, task + ".img"), ct).ConfigureAwait(false), lazy: true, ct).ConfigureAwait(false);
            lines.Add($"{task} {S(mm)} {S(uffd)}");
        }
        await File.WriteAllLinesAsync(Path.Combine(dir, "restored"), lines, ct).ConfigureAwait(false);
        await ctx.SignalAsync("restored").ConfigureAwait(false);
        await ctx.WaitAsync("resumed", ct).ConfigureAwait(false);
        await ctx.SignalAsync("restore-finished").ConfigureAwait(false);
    }

    /// <summary>One task from its image (ImportMm): lazily, the pages left out and every VMA registered MISSING on one uffd with the events CRIU needs.</summary>
    internal static async Task<(long Mm, long Uffd)> RestoreAsync(UffdClient c, long machine, byte[] bytes, bool lazy, CancellationToken ct)
    {
        var image = MmImage.Parser.ParseFrom(bytes);
        if (lazy)
        {
            image.Uffds.Clear();
            image.Uffds.Add(new UffdImage { Features = Features, Flags = 0x80800 });
            foreach (var v in image.Vmas)
            {
                v.Pages.Clear();
                v.Uffd = 1;
                v.UffdMode = 1;
            }
        }
        var r = await c.ImportMmAsync(machine, Google.Protobuf.MessageExtensions.ToByteArray(image), ct).ConfigureAwait(false);
        return (r.Mm.MmId, lazy ? r.UffdIds[0] : 0);
    }

    private static async Task<Dictionary<string, (long Mm, long Uffd)>> RestoredAsync(RoleContext ctx, CancellationToken ct)
    {
        await ctx.WaitAsync("restored", ct).ConfigureAwait(false);
        var d = new Dictionary<string, (long, long)>(StringComparer.Ordinal);
        foreach (var line in await File.ReadAllLinesAsync(Path.Combine(ctx.State["images"], "restored"), ct).ConfigureAwait(false))
        {
            var w = line.Split(' ');
            d[w[0]] = (long.Parse(w[1], CultureInfo.InvariantCulture), long.Parse(w[2], CultureInfo.InvariantCulture));
        }
        return d;
    }

    /// <summary>The daemon's view of a task's image: its pages that hold data, by dump-time address.</summary>
    internal static LazyImage ImageOf(byte[] image)
    {
        var pages = new Dictionary<ulong, byte[]>();
        foreach (var v in MmImage.Parser.ParseFrom(image).Vmas)
        {
            foreach (var pg in v.Pages)
            {
                var data = pg.Data.ToByteArray();
                if (data.AsSpan().ContainsAnyExcept((byte)0))
                    pages[v.Start + (pg.Index * PageCheck.PageSize)] = data;
            }
        }
        return new LazyImage(pages);
    }

    /// <summary>The handler role: the lazy-pages daemon, from the restored uffds until every page is restored.</summary>
    private static async Task DaemonAsync(RoleContext ctx, CancellationToken ct)
    {
        var restored = await RestoredAsync(ctx, ct).ConfigureAwait(false);
        using var daemon = new LazyPagesDaemon(ctx.Client, ctx.WrongHandler == "ignores-remap" ? LazyDaemonKind.IgnoresRemap : LazyDaemonKind.Criu);
        foreach (var task in Tasks)
        {
            var bytes = await File.ReadAllBytesAsync(Path.Combine(ctx.State["images"], task + ".img"), ct).ConfigureAwait(false);
            var vmas = MmImage.Parser.ParseFrom(bytes).Vmas.Select(v => (v.Start, v.End));
            daemon.AddTask(task, restored[task].Uffd, ImageOf(bytes), vmas);
        }
        await daemon.RunAsync(ctx.WaitAsync("restore-finished", ct), ct).ConfigureAwait(false);
        daemon.Stats.ReportTo(ctx.Report);
    }

    /// <summary>The guest role: the restored tree runs its workload; the tasks alive at the end go to the check.</summary>
    private static async Task GuestAsync(RoleContext ctx, CancellationToken ct)
    {
        var restored = await RestoredAsync(ctx, ct).ConfigureAwait(false);
        var alive = await LazyWorkload.RunAsync(ctx.Client, restored["P"].Mm, restored["Q"].Mm, ctx.Options, () => ctx.SignalAsync("resumed"), ctx.Report, ct).ConfigureAwait(false);
        foreach (var (task, mm) in alive)
            ctx.Report.Set("_mm." + task, mm);
    }

    /// <summary>
    /// The address ranges and their protections, adjacent VMAs with equal protections joined:
    /// the lazy restore's UNREGISTER of a removed range splits a VMA whose pieces then fault
    /// in anon_vmas of their own, so they may stay apart after the uffd is closed, where
    /// the eager copy keeps one VMA. The memory a task sees is the same.
    /// </summary>
    private static List<(ulong Start, ulong End, string Perms)> Layout(IReadOnlyList<VmaInfo> vmas)
    {
        var list = new List<(ulong Start, ulong End, string Perms)>();
        foreach (var v in vmas)
        {
            if (list.Count > 0 && list[^1].End == v.Start && list[^1].Perms == v.Perms)
                list[^1] = (list[^1].Start, v.End, v.Perms);
            else
                list.Add((v.Start, v.End, v.Perms));
        }
        return list;
    }

    public override async Task<RecipeCheck> CheckAsync(RecipeContext ctx, RecipeSetup setup, RoleReport report, CancellationToken ct)
    {
        var c = ctx.Client;
        var dir = setup.State["images"];
        try
        {
            if (!report.Has("_mm.P"))
                return RecipeCheck.Fail("the restored tree did not finish its workload");
            // The same workload on an eagerly restored copy of the tree.
            var p = (await RestoreAsync(c, setup.MachineId, await File.ReadAllBytesAsync(Path.Combine(dir, "P.img"), ct).ConfigureAwait(false), lazy: false, ct).ConfigureAwait(false)).Mm;
            var q = (await RestoreAsync(c, setup.MachineId, await File.ReadAllBytesAsync(Path.Combine(dir, "Q.img"), ct).ConfigureAwait(false), lazy: false, ct).ConfigureAwait(false)).Mm;
            var eager = await LazyWorkload.RunAsync(c, p, q, ctx.Options, null, new RoleReport(), ct).ConfigureAwait(false);
            var details = new List<string>();
            foreach (var (task, refMm) in eager)
            {
                var mm = report.Get("_mm." + task);
                var vmas = Layout(await c.ListVmasAsync(mm, ct).ConfigureAwait(false));
                var refVmas = Layout(await c.ListVmasAsync(refMm, ct).ConfigureAwait(false));
                var layout = string.Join(" ", vmas.Select(v => $"{v.Start:x}-{v.End:x} {v.Perms}"));
                var refLayout = string.Join(" ", refVmas.Select(v => $"{v.Start:x}-{v.End:x} {v.Perms}"));
                if (layout != refLayout)
                    return RecipeCheck.Fail($"task {task}: mappings [{layout}], the eager restore has [{refLayout}]");
                foreach (var v in vmas)
                {
                    var n = (int)((v.End - v.Start) / PageCheck.PageSize);
                    var expected = await PageCheck.ImagesAsync(c, refMm, v.Start, n, ct).ConfigureAwait(false);
                    var actual = await PageCheck.ImagesAsync(c, mm, v.Start, n, ct).ConfigureAwait(false);
                    var check = PageCheck.Compare($"task {task} {v.Start:x}-{v.End:x} vs the eager restore", v.Start, expected, actual);
                    if (!check.Passed)
                        return check;
                }
                details.Add($"{task} ({vmas.Count} mappings)");
            }
            return RecipeCheck.Pass($"tasks {string.Join(", ", details)} equal the eager restore byte for byte");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
