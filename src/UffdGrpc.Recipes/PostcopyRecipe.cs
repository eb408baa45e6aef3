using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes;

/// <summary>
/// Postcopy live migration as QEMU does it (migration/postcopy-ram.c): the destination's RAM
/// is registered MISSING and its guest runs at once; the destination's fault thread asks the
/// source for each faulting page and places it with UFFDIO_COPY (UFFDIO_ZEROPAGE for a page
/// of zeros) while a background push sends every page not yet asked for. A page asked for
/// is marked sent, as the source's bitmap does, so the push never sends it again.
/// <para>Roles: <c>source</c> (the source VM: writes its memory, then a precopy pass reads it
/// and the VM dirties some pages again before it stops at switch-over), <c>handler</c> (the
/// destination's fault thread and the push: a precopy cache, checked against the source's
/// page digest before use), <c>guest</c> (the destination's vCPU threads, reading and writing
/// from switch-over on).</para>
/// <para>Check: the destination equals the source at switch-over byte for byte (with the
/// destination guest's own writes on top), every page present, and the guest completed.</para>
/// </summary>
public sealed class PostcopyRecipe : Recipe
{
    public const ulong Base = 0x7f10_0000_0000;

    public override string Name => "postcopy";
    public override string Description => "QEMU postcopy: a MISSING-registered destination served from the source on demand while a background push copies the rest.";
    public override IReadOnlyList<string> Roles { get; } = ["source", "handler", "guest"];

    public override IReadOnlyDictionary<string, string> WrongHandlers { get; } = new Dictionary<string, string>
    {
        ["wake-without-copy"] = "answers a fault with UFFDIO_WAKE without placing the page (and marks it sent): the thread re-faults forever",
        ["stale-page"] = "places the page from its precopy cache without checking it against the source: pages dirtied after the precopy pass arrive stale",
    };

    public override async Task<RecipeSetup> SetupAsync(RecipeContext ctx, CancellationToken ct)
    {
        var c = ctx.Client;
        var pages = ctx.Options.Pages > 0 ? ctx.Options.Pages : 64;
        var len = (ulong)pages * PageCheck.PageSize;
        var machine = await c.CreateMachineAsync(ct: ct).ConfigureAwait(false);
        var setup = new RecipeSetup(machine.MachineId);
        var (src, dst) = await TwoMappedProcessesAsync(c, machine.MachineId, Base, len, "source", "destination", ct).ConfigureAwait(false);
        var (e, uffd) = await c.CreateUffdAsync(dst, ct: ct).ConfigureAwait(false);
        e.Expect("userfaultfd");
        (await c.ApiAsync(uffd, ct: ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_API");
        (await c.RegisterAsync(uffd, Base, len, 1, ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_REGISTER MISSING");
        setup.State["src"] = src.ToString(CultureInfo.InvariantCulture);
        setup.State["dst"] = dst.ToString(CultureInfo.InvariantCulture);
        setup.State["uffd"] = uffd.ToString(CultureInfo.InvariantCulture);
        setup.State["base"] = Base.ToString(CultureInfo.InvariantCulture);
        setup.State["pages"] = pages.ToString(CultureInfo.InvariantCulture);
        return setup;
    }

    public override Task RunRoleAsync(string role, RoleContext ctx, CancellationToken ct) => role switch
    {
        "source" => SourceAsync(ctx, ct),
        "handler" => new PostcopyHandler(ctx).RunAsync(ct),
        "guest" => GuestAsync(ctx, ct),
        _ => throw new ArgumentException($"postcopy has no role {role}", nameof(role)),
    };

    // The source VM: its memory written (some pages left zero), a precopy pass, pages dirtied
    // again while that pass ran, then it stops: switch-over.
    private static async Task SourceAsync(RoleContext ctx, CancellationToken ct)
    {
        var pages = (int)ctx.Id("pages");
        var rng = new Random(unchecked((int)ctx.Options.Seed));
        var written = Enumerable.Range(0, pages).Where(_ => rng.NextDouble() < 0.7).ToList();
        var dirtied = written.Where(_ => rng.NextDouble() < 0.3).ToList();
        var guest = new ThreadGuest(ctx.Client);
        var plan = new GuestPlan(ctx.Id("src"), ctx.U64("base"), pages) { Ops = written.Count, WriteRatio = 1, Pattern = AccessPattern.Sequential, WritablePages = written, Seed = ctx.Options.Seed, Stall = ctx.Options.Stall };
        await guest.RunAsync(plan, ct).ConfigureAwait(false);
        await ctx.SignalAsync("precopy").ConfigureAwait(false);
        await ctx.WaitAsync("precopy-done", ct).ConfigureAwait(false);
        if (dirtied.Count > 0)
            await guest.RunAsync(plan with { Ops = dirtied.Count, WritablePages = dirtied, FirstGeneration = 2 }, ct).ConfigureAwait(false);
        ctx.Report.Set("source-pages-written", written.Count);
        ctx.Report.Set("source-pages-dirtied-after-precopy", dirtied.Count);
        // Switch-over once the destination VM is up (its process connected).
        await ctx.WaitAsync("guest-ready", ct).ConfigureAwait(false);
        await ctx.SignalAsync("switchover").ConfigureAwait(false);
    }

    // The destination's vCPUs: from switch-over on, two threads read and write their RAM.
    private static async Task GuestAsync(RoleContext ctx, CancellationToken ct)
    {
        try
        {
            await ctx.Client.Mm.GetMmAsync(new GetMmRequest { MmId = ctx.Id("dst") }, cancellationToken: ct).ConfigureAwait(false);
            await ctx.SignalAsync("guest-ready").ConfigureAwait(false);
            await ctx.WaitAsync("switchover", ct).ConfigureAwait(false);
            var pages = (int)ctx.Id("pages");
            var plan = new GuestPlan(ctx.Id("dst"), ctx.U64("base"), pages) { Threads = 2, Ops = pages, WriteRatio = 0.3, Seed = ctx.Options.Seed + 1, Stall = ctx.Options.Stall };
            var run = await new WorkloadGuest(ctx.Client).RunAsync(plan, ct).ConfigureAwait(false);
            ReportGuest(ctx.Report, run);
        }
        finally
        {
            await ctx.SignalAsync("guest-done").ConfigureAwait(false);
        }
    }

    /// <summary>Puts a guest run into the report: its progress, its stall, and (as private counters) the last generation written to each page.</summary>
    internal static void ReportGuest(RoleReport report, GuestRun run)
    {
        report.Set("guest-accesses-planned", run.Planned);
        report.Set("guest-accesses-done", run.Done);
        if (run.Stalled is { } s)
            report.Note(s);
        if (run.BlocktimeNs >= 0)
            report.Set("guest-blocktime-us", run.BlocktimeNs / 1000);
        if (run.Userfaults >= 0)
            report.Set("guest-userfaults", run.Userfaults);
        var last = new Dictionary<int, int>();
        foreach (var w in run.Writes.OrderBy(w => w.Order))
            last[w.Page] = w.Generation;
        foreach (var (p, g) in last)
            report.Set(LastWriteKey(p), g);
    }

    internal static string LastWriteKey(int page) => "_guest.last-write." + page.ToString(CultureInfo.InvariantCulture);

    public override async Task<RecipeCheck> CheckAsync(RecipeContext ctx, RecipeSetup setup, RoleReport report, CancellationToken ct)
    {
        var pages = int.Parse(setup.State["pages"], CultureInfo.InvariantCulture);
        var src = await PageCheck.ImagesAsync(ctx.Client, long.Parse(setup.State["src"], CultureInfo.InvariantCulture), Base, pages, ct).ConfigureAwait(false);
        var dst = await PageCheck.ImagesAsync(ctx.Client, long.Parse(setup.State["dst"], CultureInfo.InvariantCulture), Base, pages, ct).ConfigureAwait(false);
        // The source at switch-over (it no longer runs), with the destination guest's writes on top.
        var expected = src.ToArray();
        for (var p = 0; p < pages; p++)
        {
            if (report.Has(LastWriteKey(p)))
                expected[p] = new PageImage(PageState.Present, PageCheck.Sha(WorkloadPages.Expected(Base + ((ulong)p * PageCheck.PageSize), (ulong)report.Get(LastWriteKey(p)))));
        }
        var bytes = PageCheck.Compare("destination vs source at switch-over", Base, expected, dst, requirePresent: true);
        var planned = report.Get("guest-accesses-planned");
        var done = report.Get("guest-accesses-done");
        if (planned == 0 || done < planned)
            return RecipeCheck.Fail($"the destination guest completed {done} of {planned} accesses; {bytes}");
        return bytes;
    }
}
