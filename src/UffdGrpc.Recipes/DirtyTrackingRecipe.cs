using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes;

/// <summary>
/// Pre-copy dirty tracking: the source's RAM is registered WP with UFFD_FEATURE_WP_ASYNC (the
/// kernel resolves each write itself and the page reads as written), a bulk round copies
/// every page to the destination, then each round collects the written pages and re-arms
/// them in one PAGEMAP_SCAN (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, category
/// PAGE_IS_WRITTEN) and copies them, until the dirty set converges; then the guest stops and
/// a last round copies what is left. With <c>--set tracking=soft-dirty</c> the machine runs
/// the 6.1 profile with CONFIG_MEM_SOFT_DIRTY and rounds read /proc/PID/pagemap's soft-dirty
/// bit and clear it with clear_refs 4, with the guest frozen across both calls as CRIU does.
/// <para>Roles: <c>guest</c> (writes a 90/10 hot set until told to stop), <c>tracker</c>.
/// In one process the two run under a seeded interleaving (<c>--seed</c>; <c>--seeds N</c>
/// explores N of them), so each seed gives one order of calls on the server.</para>
/// <para>Check: the destination equals the source after the final round, and every write
/// the guest made was reported by the first scan that followed it.</para>
/// </summary>
public sealed class DirtyTrackingRecipe : Recipe
{
    public const ulong Base = 0x7f30_0000_0000;

    public override string Name => "dirty-tracking";
    public override string Description => "Pre-copy rounds with WP_ASYNC + PAGEMAP_SCAN (collect and re-arm in one call) until the dirty set converges; soft-dirty on the 6.1 profile.";
    public override IReadOnlyList<string> Roles { get; } = ["guest", "tracker"];

    public override IReadOnlyDictionary<string, string> WrongHandlers { get; } = new Dictionary<string, string>
    {
        ["two-calls"] = "collects with PAGEMAP_SCAN, then re-protects what it reported with UFFDIO_WRITEPROTECT in a second call: a write in between is never reported",
    };

    private static bool SoftDirty(RecipeOptions o) => o.Setting("tracking", "wp-async") == "soft-dirty";

    public override async Task<RecipeSetup> SetupAsync(RecipeContext ctx, CancellationToken ct)
    {
        var c = ctx.Client;
        var pages = ctx.Options.Pages > 0 ? ctx.Options.Pages : 32;
        var len = (ulong)pages * PageCheck.PageSize;
        var soft = SoftDirty(ctx.Options);
        if (!soft && ctx.Options.Setting("tracking", "wp-async") != "wp-async")
            throw new ArgumentException("dirty-tracking: --set tracking=wp-async or soft-dirty");
        var machine = soft
            ? await c.CreateMachineAsync(KernelProfile.V61, softDirty: true, ct: ct).ConfigureAwait(false)
            : await c.CreateMachineAsync(ct: ct).ConfigureAwait(false);
        var setup = new RecipeSetup(machine.MachineId);
        var (src, dst) = await TwoMappedProcessesAsync(c, machine.MachineId, Base, len, "source", "destination", ct).ConfigureAwait(false);
        // The guest ran before migration started: every page written once.
        await new ThreadGuest(c).RunAsync(new GuestPlan(src, Base, pages) { Ops = pages, WriteRatio = 1, Pattern = AccessPattern.Sequential }, ct).ConfigureAwait(false);
        setup.State["src"] = src.ToString(CultureInfo.InvariantCulture);
        setup.State["dst"] = dst.ToString(CultureInfo.InvariantCulture);
        setup.State["base"] = Base.ToString(CultureInfo.InvariantCulture);
        setup.State["pages"] = pages.ToString(CultureInfo.InvariantCulture);
        // In one process: the seeded interleaving of the two roles, and the ledger of writes and scans in its order.
        var gate = new SeededInterleaver(ctx.Options.Seed);
        gate.Join("guest0");
        gate.Join("tracker");
        setup.Private["gate"] = gate;
        setup.Private["ledger"] = new DirtyLedger();
        return setup;
    }

    public override Task RunRoleAsync(string role, RoleContext ctx, CancellationToken ct) => role switch
    {
        "guest" => GuestAsync(ctx, ct),
        "tracker" => new DirtyTracker(ctx, SoftDirty(ctx.Options)).RunAsync(ct),
        _ => throw new ArgumentException($"dirty-tracking has no role {role}", nameof(role)),
    };

    private static async Task GuestAsync(RoleContext ctx, CancellationToken ct)
    {
        // In the runner's process the guest runs under the seeded interleaving (client-driven
        // accesses, its writes in the ledger in turn order); in its own process it is a
        // server-side workload at --set dirty-rate=N pages/s, its writes in the server's record.
        var gate = ctx.Shared?["gate"] as SeededInterleaver;
        try
        {
            // The guest's process is up (connected) before the tracker starts its rounds.
            await ctx.Client.Mm.GetMmAsync(new GetMmRequest { MmId = ctx.Id("src") }, cancellationToken: ct).ConfigureAwait(false);
            await ctx.SignalAsync("guest-ready").ConfigureAwait(false);
            await ctx.WaitAsync("armed", ct).ConfigureAwait(false);
            using var stop = new CancellationTokenSource();
            _ = ctx.WaitAsync("stop", ct).ContinueWith(_ => stop.Cancel(), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            var pages = (int)ctx.Id("pages");
            var plan = new GuestPlan(ctx.Id("src"), ctx.U64("base"), pages)
            {
                Ops = 1_000_000,
                WriteRatio = 1,
                Pattern = AccessPattern.HotSet,
                Seed = ctx.Options.Seed,
                FirstGeneration = 2,
                Stall = ctx.Options.Stall,
                Gate = gate,
                Stop = stop.Token,
            };
            IGuest guest = gate is null
                ? new WorkloadGuest(ctx.Client) { DirtyRate = double.Parse(ctx.Options.Setting("dirty-rate", "200"), CultureInfo.InvariantCulture) }
                : new ThreadGuest(ctx.Client);
            var run = await guest.RunAsync(plan, ct).ConfigureAwait(false);
            ctx.Report.Set("guest-writes", run.Writes.Count);
            if (run.Stalled is { } s)
                ctx.Report.Note(s);
            if (gate is not null && ctx.Shared?["ledger"] is DirtyLedger ledger)
            {
                ledger.Seeded = true;
                ledger.Writes.AddRange(run.Writes);
            }
        }
        finally
        {
            gate?.Leave("guest0");
            await ctx.SignalAsync("guest-stopped").ConfigureAwait(false);
        }
    }

    public override async Task<RecipeCheck> CheckAsync(RecipeContext ctx, RecipeSetup setup, RoleReport report, CancellationToken ct)
    {
        var pages = int.Parse(setup.State["pages"], CultureInfo.InvariantCulture);
        var src = await PageCheck.ImagesAsync(ctx.Client, long.Parse(setup.State["src"], CultureInfo.InvariantCulture), Base, pages, ct).ConfigureAwait(false);
        var dst = await PageCheck.ImagesAsync(ctx.Client, long.Parse(setup.State["dst"], CultureInfo.InvariantCulture), Base, pages, ct).ConfigureAwait(false);
        var bytes = PageCheck.Compare("destination vs source after the final round", Base, src, dst);
        if (!report.Has("final-round"))
            return RecipeCheck.Fail($"the tracker did not reach its final round; {bytes}");
        var ledger = (DirtyLedger)setup.Private["ledger"];
        ledger.Scans.AddRange(DirtyLedger.ScansFrom(report));
        if (!ledger.Seeded)
        {
            // The roles ran as processes: the writes are the server's record of the guest workload.
            var workloads = await ctx.Client.Workloads.ListWorkloadsAsync(new ListWorkloadsRequest { MachineId = setup.MachineId }, cancellationToken: ct).ConfigureAwait(false);
            foreach (var w in workloads.Workloads)
            {
                ulong from = 0;
                while (true)
                {
                    var r = await ctx.Client.Workloads.ReadWritesAsync(new ReadWritesRequest { WorkloadId = w.WorkloadId, FromIndex = from }, cancellationToken: ct).ConfigureAwait(false);
                    ledger.Writes.AddRange(r.Writes.Select(x => new GuestWrite((int)((x.Page - Base) / PageCheck.PageSize), (int)x.Generation, (int)x.ThreadId, (long)x.Seq)));
                    if (r.Writes.Count == 0 || r.NextIndex >= r.Recorded)
                        break;
                    from = r.NextIndex;
                }
                if (w.WritesTruncated)
                    return RecipeCheck.Fail($"the server's write record of workload {w.WorkloadId} is truncated; {bytes}");
            }
        }
        if (ledger.FirstUnreported() is { } lost)
            return RecipeCheck.Fail($"{lost}; {bytes}");
        return bytes.Passed
            ? RecipeCheck.Pass($"{bytes.Detail}; each of {ledger.Writes.Count} writes reported by the first of {ledger.Scans.Count} scans after it")
            : bytes;
    }
}

/// <summary>
/// The guest's writes and the tracker's scans in one order: the seeded interleaving's turns
/// (roles in one process), or the server's machine-wide write sequence (a write with seq at
/// most a scan's machine_seq landed before it; the scan's order is machine_seq + 1).
/// </summary>
public sealed class DirtyLedger
{
    public List<GuestWrite> Writes { get; } = [];
    public List<(long Order, HashSet<int> Reported)> Scans { get; } = [];

    /// <summary>The writes came from the seeded guest in the runner's process (else: read the server's record).</summary>
    public bool Seeded { get; set; }

    /// <summary>The tracker's report of scan <paramref name="i"/> (private counters the check reads back).</summary>
    public static void Record(RoleReport report, int i, long order, IEnumerable<int> pages)
    {
        report.Set($"_scan.{i}.order", order);
        foreach (var p in pages)
            report.Set($"_scan.{i}.page.{p}", 1);
    }

    /// <summary>The scans recorded in <paramref name="report"/>, in order.</summary>
    public static IEnumerable<(long Order, HashSet<int> Reported)> ScansFrom(RoleReport report)
    {
        for (var i = 0; report.Has($"_scan.{i}.order"); i++)
        {
            var prefix = $"_scan.{i}.page.";
            var pages = report.Counters.Where(kv => kv.Key.StartsWith(prefix, StringComparison.Ordinal)).Select(kv => int.Parse(kv.Key[prefix.Length..], CultureInfo.InvariantCulture));
            yield return (report.Get($"_scan.{i}.order"), [.. pages]);
        }
    }

    /// <summary>The first write the first scan after it did not report (null: none).</summary>
    public string? FirstUnreported()
    {
        foreach (var w in Writes.OrderBy(w => w.Order))
        {
            var i = Scans.FindIndex(s => s.Order > w.Order);
            if (i < 0)
                return $"the write of page {w.Page} (generation {w.Generation}, at {w.Order}) came after the final scan";
            if (!Scans[i].Reported.Contains(w.Page))
                return $"LOST WRITE: page {w.Page} written (generation {w.Generation}) at {w.Order}; scan {i + 1} (at {(Scans[i].Order == long.MaxValue ? "the end" : Scans[i].Order.ToString(CultureInfo.InvariantCulture))}) did not report it";
        }
        return null;
    }
}

/// <summary>The tracker role: arm, bulk round, collect-and-re-arm rounds until the dirty set converges, stop the guest, final round.</summary>
internal sealed class DirtyTracker(RoleContext ctx, bool softDirty)
{
    private const ulong FeatureWpUnpopulated = 1 << 13;
    private const ulong FeatureWpAsync = 1 << 15;
    private const ulong PmScanWpMatching = 1;
    private const ulong PmScanCheckWpasync = 2;
    private const ulong PageIsWritten = 1 << 1;

    private readonly UffdClient _c = ctx.Client;
    private readonly SeededInterleaver? _gate = ctx.Shared?["gate"] as SeededInterleaver;
    private int _scans;
    private readonly long _src = ctx.Id("src");
    private readonly long _dst = ctx.Id("dst");
    private readonly ulong _base = ctx.U64("base");
    private readonly int _pages = (int)ctx.Id("pages");
    private long _uffd;

    private ulong Len => (ulong)_pages * PageCheck.PageSize;

    private async Task<long> StepAsync(CancellationToken ct) => _gate is null ? -1 : await _gate.StepAsync("tracker", ct).ConfigureAwait(false);

    public async Task RunAsync(CancellationToken ct)
    {
        try
        {
            await ctx.WaitAsync("guest-ready", ct).ConfigureAwait(false);
            await ArmAsync(ct).ConfigureAwait(false);
            await ctx.SignalAsync("armed").ConfigureAwait(false);
            // A free-running guest: rounds at most every --set round-ms=N ms (default 20), as long as a real round's copy takes.
            var roundGap = TimeSpan.FromMilliseconds(_gate is null ? double.Parse(ctx.Options.Setting("round-ms", "20"), CultureInfo.InvariantCulture) : 0);
            await StepAsync(ct).ConfigureAwait(false);
            await CopyAsync([(_base, _base + Len)], ct).ConfigureAwait(false);
            var perRound = new List<int>();
            // The dirty rate of each round: pages the round's scan found over the time since the previous scan (QEMU's dirty-pages-rate).
            var ratePerRound = new List<double>();
            var lastScan = System.Diagnostics.Stopwatch.GetTimestamp();
            // Converged when a round finds at most this many dirty pages (--set converge=N), or after --set max-rounds=N rounds.
            var threshold = int.Parse(ctx.Options.Setting("converge", Math.Max(1, _pages / 32).ToString(CultureInfo.InvariantCulture)), CultureInfo.InvariantCulture);
            var maxRounds = int.Parse(ctx.Options.Setting("max-rounds", "10"), CultureInfo.InvariantCulture);
            for (var round = 1; round <= maxRounds; round++)
            {
                if (roundGap > TimeSpan.Zero)
                    await Task.Delay(roundGap, ct).ConfigureAwait(false);
                var dirty = await CollectAsync(await StepAsync(ct).ConfigureAwait(false), ct).ConfigureAwait(false);
                var n = dirty.Sum(r => (int)((r.End - r.Start) / PageCheck.PageSize));
                perRound.Add(n);
                var now = System.Diagnostics.Stopwatch.GetTimestamp();
                ratePerRound.Add(n / Math.Max(System.Diagnostics.Stopwatch.GetElapsedTime(lastScan, now).TotalSeconds, 1e-6));
                lastScan = now;
                if (dirty.Count > 0)
                {
                    await StepAsync(ct).ConfigureAwait(false);
                    await CopyAsync(dirty, ct).ConfigureAwait(false);
                }
                if (n <= threshold)
                    break;
            }
            ctx.Report.Set("rounds", perRound.Count);
            ctx.Report.Note($"dirty pages per round: {string.Join(' ', perRound)} ({(perRound[^1] <= threshold ? $"converged: at most {threshold}" : $"not converged after {maxRounds} rounds")})");
            ctx.Report.Note($"dirty rate per round (pages/s, since the previous scan): {string.Join(' ', ratePerRound.Select(r => r.ToString("0", CultureInfo.InvariantCulture)))}");
        }
        finally
        {
            // Stop the guest (the source VM pauses), then the final round.
            _gate?.Leave("tracker");
            await ctx.SignalAsync("stop").ConfigureAwait(false);
        }
        await ctx.WaitAsync("guest-stopped", ct).ConfigureAwait(false);
        var last = await CollectAsync(long.MaxValue, ct).ConfigureAwait(false);
        await CopyAsync(last, ct).ConfigureAwait(false);
        ctx.Report.Set("final-round", last.Sum(r => (int)((r.End - r.Start) / PageCheck.PageSize)));
    }

    private async Task ArmAsync(CancellationToken ct)
    {
        if (softDirty)
        {
            if (_gate is null)
                throw new InvalidOperationException("soft-dirty tracking freezes the guest across pagemap + clear_refs: run it with the roles in one process");
            (await _c.ClearRefsAsync(_src, "4", ct).ConfigureAwait(false)).Expect("clear_refs 4");
            return;
        }
        var (e, uffd) = await _c.CreateUffdAsync(_src, ct: ct).ConfigureAwait(false);
        e.Expect("userfaultfd");
        _uffd = uffd;
        (await _c.ApiAsync(uffd, FeatureWpAsync | FeatureWpUnpopulated, ct: ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_API WP_ASYNC|WP_UNPOPULATED");
        (await _c.RegisterAsync(uffd, _base, Len, 2, ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_REGISTER WP");
        (await _c.WriteprotectAsync(uffd, _base, Len, 1, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT");
    }

    // One collection: the pages written since the last one, re-armed. Turn: the interleaver's turn of its first call.
    private async Task<List<(ulong Start, ulong End)>> CollectAsync(long turn, CancellationToken ct)
    {
        List<(ulong Start, ulong End)> dirty;
        var order = turn;
        if (softDirty)
        {
            // pagemap then clear_refs: two calls, inside one turn (the guest is frozen across them, as CRIU freezes the task).
            var entries = await _c.PagemapAsync(_src, _base, (uint)_pages, ct).ConfigureAwait(false);
            dirty = [.. entries.Where(e => e.SoftDirty).Select(e => (e.Addr, e.Addr + PageCheck.PageSize))];
            (await _c.ClearRefsAsync(_src, "4", ct).ConfigureAwait(false)).Expect("clear_refs 4");
            ctx.Report.Add("pagemap-reads");
        }
        else
        {
            var twoCalls = ctx.WrongHandler == "two-calls";
            var r = await _c.PagemapScanAsync(new PagemapScanRequest
            {
                MmId = _src,
                Flags = twoCalls ? 0 : PmScanWpMatching | PmScanCheckWpasync,
                Start = _base,
                End = _base + Len,
                VecLen = (ulong)_pages,
                CategoryMask = PageIsWritten,
                ReturnMask = PageIsWritten,
            }, ct).ConfigureAwait(false);
            r.Errno.Expect("PAGEMAP_SCAN");
            if (_gate is null)
                order = (long)r.MachineSeq + 1; // free-running guest: the server's write sequence orders the scan
            ctx.Report.Add("scans");
            dirty = [.. r.Regions.Select(g => (g.Start, g.End))];
            if (twoCalls)
            {
                // WRONG: re-protect in a second call; a write between the two is neither reported nor tracked.
                foreach (var (s, e) in dirty)
                {
                    await StepAsync(ct).ConfigureAwait(false);
                    (await _c.WriteprotectAsync(_uffd, s, e - s, 1, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT");
                }
            }
        }
        var pages = new HashSet<int>();
        foreach (var (s, e) in dirty)
        {
            for (var a = s; a < e; a += PageCheck.PageSize)
                pages.Add((int)((a - _base) / PageCheck.PageSize));
        }
        DirtyLedger.Record(ctx.Report, _scans++, order, pages);
        ctx.Report.Add("dirty-pages-reported", pages.Count);
        return dirty;
    }

    // Copies regions from the source to the destination: process_vm_readv by the destination from the source.
    private async Task CopyAsync(List<(ulong Start, ulong End)> regions, CancellationToken ct)
    {
        if (regions.Count == 0)
            return;
        var iov = regions.Select(r => new Iovec { Base = r.Start, Len = r.End - r.Start }).ToList();
        var res = await _c.ProcessVmReadvAsync(_dst, _src, iov, iov, ct: ct).ConfigureAwait(false);
        res.Errno.Expect("process_vm_readv");
        ctx.Report.Add("pages-copied", res.Transferred / (long)PageCheck.PageSize);
        ctx.Report.Add("bytes-copied", res.Transferred);
        ctx.Report.Add("copy-calls");
    }
}
