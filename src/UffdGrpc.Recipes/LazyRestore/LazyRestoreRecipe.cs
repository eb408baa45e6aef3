using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Recipes.RestoreCommon;

namespace UffdGrpc.Recipes.LazyRestore;

/// <summary>Options of one lazy-restore run.</summary>
public sealed record LazyRestoreOptions
{
    /// <summary>Pages of the root task's main region (the other regions are fixed).</summary>
    public int Pages { get; init; } = 2048;
    public int Seed { get; init; } = 1;
    public LazyDaemonKind Daemon { get; init; } = LazyDaemonKind.Criu;
}

/// <summary>A run's checks (one per task that lives to the end) and what the daemon did.</summary>
public sealed record LazyRestoreReport(LazyDaemonKind Daemon, IReadOnlyList<PageCheckResult> Checks, LazyDaemonStats Stats)
{
    public bool Passed => Checks.All(c => c.Passed);
}

/// <summary>
/// CRIU's lazy restore (<c>criu restore --lazy-pages</c> with <c>criu lazy-pages</c>), in its
/// roles: the source (a dumped process tree: a root task P and its child Q), the restorer
/// (each task's VMAs rebuilt from the image, its pages left out, its lazy ranges registered
/// MISSING on a uffd with EVENT_FORK | REMAP | UNMAP | REMOVE and handed to the daemon),
/// the lazy-pages daemon (<see cref="LazyPagesDaemon"/>) and the restored tree running. The
/// tree forks, mremaps, munmaps, releases memory and lets a child exit mid-restore; the
/// check: every task that lives to the end equals, byte for byte and VMA for VMA, the same
/// workload run on an eagerly restored copy of the tree.
/// </summary>
public static class LazyRestoreRecipe
{
    public const ulong RegionA = 0x5000_0000;
    public const ulong RegionB = 0x6000_0000;
    public const ulong RegionC = 0x7000_0000;
    public const ulong RegionD = 0x8000_0000;
    private const int SmallPages = 64;
    private const ulong Features = 0x2 | 0x4 | 0x8 | 0x40; // EVENT_FORK | EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP

    /// <summary>The dumped tree: each task's image (a serialized MmImage).</summary>
    public sealed record Dump(byte[] P, byte[] Q);

    /// <summary>A restored tree: each task's process, main thread and uffd (0 when restored eagerly).</summary>
    public sealed record Tree(long P, long PThread, long PUffd, long Q, long QThread, long QUffd);

    public static async Task<LazyRestoreReport> RunAsync(UffdClient client, LazyRestoreOptions o, CancellationToken ct = default)
    {
        var machine = (await client.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        try
        {
            var dump = await DumpAsync(client, machine, o, ct).ConfigureAwait(false);
            var lazy = await RestoreAsync(client, machine, dump, lazy: true, ct).ConfigureAwait(false);
            var eager = await RestoreAsync(client, machine, dump, lazy: false, ct).ConfigureAwait(false);
            using var daemon = new LazyPagesDaemon(client, o.Daemon);
            daemon.AddTask("P", lazy.PUffd, ImageOf(dump.P), await PageCheck.VmaRangesAsync(client, lazy.P, ct).ConfigureAwait(false));
            daemon.AddTask("Q", lazy.QUffd, ImageOf(dump.Q), await PageCheck.VmaRangesAsync(client, lazy.Q, ct).ConfigureAwait(false));
            var finished = new TaskCompletionSource();
            var serving = daemon.RunAsync(finished.Task, ct);
            var survivors = await WorkloadAsync(client, lazy, o.Seed, finished, ct).ConfigureAwait(false);
            await serving.ConfigureAwait(false);
            var reference = await WorkloadAsync(client, eager, o.Seed, null, ct).ConfigureAwait(false);
            var checks = new List<PageCheckResult>();
            foreach (var (name, mm) in survivors)
            {
                var refMm = reference[name];
                var ranges = await PageCheck.VmaRangesAsync(client, mm, ct).ConfigureAwait(false);
                var refRanges = await PageCheck.VmaRangesAsync(client, refMm, ct).ConfigureAwait(false);
                var check = await PageCheck.CompareAsync(client, $"task {name} vs the eager restore", mm, refMm, ranges.Union(refRanges).Distinct().OrderBy(r => r.Start), ct).ConfigureAwait(false);
                checks.Add(check);
            }
            return new LazyRestoreReport(o.Daemon, checks, daemon.Stats);
        }
        finally
        {
            await client.DestroyMachineAsync(machine, CancellationToken.None).ConfigureAwait(false);
        }
    }

    /// <summary>The source role: P with three regions (A: data with holes, B and C: data), Q forked from P and diverged; both dumped.</summary>
    public static async Task<Dump> DumpAsync(UffdClient client, long machine, LazyRestoreOptions o, CancellationToken ct)
    {
        var p = await client.CreateMmAsync(machine, ct).ConfigureAwait(false);
        var t = (await client.CreateThreadAsync(p, ct).ConfigureAwait(false)).ThreadId;
        var regions = new (ulong At, int Pages, int Seed)[] { (RegionA, o.Pages, o.Seed), (RegionB, SmallPages, o.Seed + 1), (RegionC, SmallPages, o.Seed + 2) };
        foreach (var (at, pages, seed) in regions)
        {
            (await client.MmapAsync(p, at, (ulong)pages * 4096, 3, ct: ct).ConfigureAwait(false)).Expect("mmap (source)");
            await WriteDataPagesAsync(client, t, at, GuestPattern.Contents(pages, seed), ct).ConfigureAwait(false);
        }
        var fork = await client.ForkAsync(p, t, ct).ConfigureAwait(false);
        fork.Errno.Expect("fork (source)");
        var q = fork.ChildMmId;
        var qt = (await client.CreateThreadAsync(q, ct).ConfigureAwait(false)).ThreadId;
        await client.MunmapAsync(q, RegionB, 2 * SmallPages * 4096UL + (RegionC - RegionB - SmallPages * 4096UL), qt, ct).ConfigureAwait(false);
        await WriteDataPagesAsync(client, qt, RegionA, GuestPattern.Contents(o.Pages / 2, o.Seed + 3), ct).ConfigureAwait(false);
        return new Dump(await client.ExportMmAsync(p, ct).ConfigureAwait(false), await client.ExportMmAsync(q, ct).ConfigureAwait(false));
    }

    /// <summary>Writes only the pages holding data (a dump then leaves the zero pages out, as CRIU does).</summary>
    private static async Task WriteDataPagesAsync(UffdClient client, long thread, ulong at, byte[] contents, CancellationToken ct)
    {
        for (var p = 0; p < contents.Length / 4096;)
        {
            if (!contents.AsSpan(p * 4096, 4096).ContainsAnyExcept((byte)0))
            {
                p++;
                continue;
            }
            var end = p;
            while (end < contents.Length / 4096 && contents.AsSpan(end * 4096, 4096).ContainsAnyExcept((byte)0))
                end++;
            (await client.WriteBytesAsync(thread, at + (ulong)p * 4096, contents.AsMemory(p * 4096, (end - p) * 4096), ct: ct).ConfigureAwait(false)).Errno.Expect("write (source)");
            p = end;
        }
    }

    /// <summary>The daemon's view of a task's image: its pages that hold data, by dump-time address.</summary>
    public static LazyImage ImageOf(byte[] image)
    {
        var pages = new Dictionary<ulong, byte[]>();
        foreach (var v in MmImage.Parser.ParseFrom(image).Vmas)
        {
            foreach (var pg in v.Pages)
            {
                var data = pg.Data.ToByteArray();
                if (data.AsSpan().ContainsAnyExcept((byte)0))
                    pages[v.Start + pg.Index * 4096] = data;
            }
        }
        return new LazyImage(pages);
    }

    /// <summary>The restorer role: each task from its image; lazily, without its pages and with every private anonymous VMA registered MISSING on a uffd with the non-cooperative events.</summary>
    public static async Task<Tree> RestoreAsync(UffdClient client, long machine, Dump dump, bool lazy, CancellationToken ct)
    {
        async Task<(long Mm, long Thread, long Uffd)> One(byte[] bytes)
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
            var r = await client.ImportMmAsync(machine, Google.Protobuf.MessageExtensions.ToByteArray(image), ct).ConfigureAwait(false);
            var thread = (await client.CreateThreadAsync(r.Mm.MmId, ct).ConfigureAwait(false)).ThreadId;
            return (r.Mm.MmId, thread, lazy ? r.UffdIds[0] : 0);
        }
        var p = await One(dump.P).ConfigureAwait(false);
        var q = await One(dump.Q).ConfigureAwait(false);
        return new Tree(p.Mm, p.Thread, p.Uffd, q.Mm, q.Thread, q.Uffd);
    }

    /// <summary>
    /// The restored tree runs. P first moves region C to D (its REMAP is the daemon's first
    /// message: the task runs as soon as it is restored), then the restorer reports the
    /// restore finished; P forks a child that touches a few pages and exits, forks a second
    /// child that lives, unmaps part of B, releases another part (MADV_DONTNEED), reads the
    /// moved region, and all tasks read and write their memory. Returns the tasks alive at the end by name.
    /// </summary>
    public static async Task<Dictionary<string, long>> WorkloadAsync(UffdClient client, Tree tree, int seed, TaskCompletionSource? restoreFinished, CancellationToken ct)
    {
        IGuest guest = new ThreadGuest(client);
        var rng = new Random(seed);
        var smallLen = SmallPages * 4096UL;
        var mremap = await client.StartOpAsync(tree.PThread, new ThreadOp { Mremap = new MremapOp { OldAddr = RegionC, Len = smallLen, NewAddr = RegionD } }, ct).ConfigureAwait(false);
        restoreFinished?.TrySetResult();
        (await client.WaitOpAsync(mremap.OpId, ct).ConfigureAwait(false)).Errno.Expect("mremap");

        var f1 = await client.ForkAsync(tree.P, tree.PThread, ct).ConfigureAwait(false);
        f1.Errno.Expect("fork");
        await guest.RunAsync(f1.ChildThreadId, Pages(RegionA, 8, 1, 2, rng), ct).ConfigureAwait(false);
        await client.DestroyMmAsync(f1.ChildMmId, ct).ConfigureAwait(false);

        var f2 = await client.ForkAsync(tree.P, tree.PThread, ct).ConfigureAwait(false);
        f2.Errno.Expect("fork");
        (await client.MunmapAsync(tree.P, RegionB, 16 * 4096, tree.PThread, ct).ConfigureAwait(false)).Expect("munmap");
        (await client.MadviseAsync(tree.P, RegionB + 32 * 4096, 16 * 4096, 4, tree.PThread, ct).ConfigureAwait(false)).Expect("MADV_DONTNEED");
        await guest.RunAsync(tree.PThread, Pages(RegionD, SmallPages, 2, 0, rng), ct).ConfigureAwait(false);
        await Task.WhenAll(
            guest.RunAsync(tree.PThread, Pages(RegionB + 16 * 4096, SmallPages - 16, 3, 2, rng).Concat(Pages(RegionA, 64, 3, 3, rng)).ToList(), ct),
            guest.RunAsync(f2.ChildThreadId, Pages(RegionA + 64 * 4096, 64, 4, 2, rng).Concat(Pages(RegionD, SmallPages, 4, 3, rng)).ToList(), ct),
            guest.RunAsync(tree.QThread, Pages(RegionA, 64, 5, 2, rng), ct)).ConfigureAwait(false);
        return new Dictionary<string, long> { ["P"] = tree.P, ["Q"] = tree.Q, ["P'"] = f2.ChildMmId };
    }

    /// <summary>Touches of <paramref name="count"/> pages from <paramref name="at"/>: every <paramref name="writeEvery"/>-th a write of generation <paramref name="gen"/> (0: reads only), in a seeded order.</summary>
    private static List<GuestTouch> Pages(ulong at, int count, uint gen, int writeEvery, Random rng) =>
        Enumerable.Range(0, count).OrderBy(_ => rng.Next()).Select(i => new GuestTouch(at + (ulong)i * 4096, writeEvery > 0 && i % writeEvery == 0, gen)).ToList();
}
