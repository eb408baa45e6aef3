using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes;

/// <summary>
/// QEMU's background snapshot (migration <c>background-snapshot</c>, ram_write_tracking_start
/// and ram_save_host_page in migration/ram.c): the guest's RAM is registered WP and
/// write-protected whole (with UFFD_FEATURE_WP_UNPOPULATED so never-touched pages are
/// protected too), then pages are copied out while the guest runs; a write to a page not yet
/// copied raises a WP fault, and the handler saves the page before it un-protects it.
/// <para>Roles: <c>handler</c> (arms the protection, copies pages out in order, serves WP
/// faults first), <c>guest</c> (vCPU threads reading and writing from the snapshot instant
/// on). The snapshot goes into a second process (the snapshot file) by process_vm_readv.</para>
/// <para>Check: the snapshot equals the guest's memory at the instant the protection was
/// armed (its digest, taken by the runner before the guest could run), byte for byte.</para>
/// </summary>
public sealed class BackgroundSnapshotRecipe : Recipe
{
    public const ulong Base = 0x7f20_0000_0000;
    private const ulong FeatureWpUnpopulated = 1 << 13;

    public override string Name => "background-snapshot";
    public override string Description => "QEMU background-snapshot: write-protect the RAM, copy it out while the guest runs, save each page before un-protecting it.";
    public override IReadOnlyList<string> Roles { get; } = ["handler", "guest"];

    public override IReadOnlyDictionary<string, string> WrongHandlers { get; } = new Dictionary<string, string>
    {
        ["unprotect-first"] = "on a WP fault un-protects the page before saving it: the woken write lands first (mitos-run/mitos#820)",
        ["no-unpopulated"] = "protects without WP_UNPOPULATED or pre-population: never-touched pages are not protected and their first write is missed (e2b-dev/infra#2742)",
    };

    public override async Task<RecipeSetup> SetupAsync(RecipeContext ctx, CancellationToken ct)
    {
        var c = ctx.Client;
        var pages = ctx.Options.Pages > 0 ? ctx.Options.Pages : 64;
        var len = (ulong)pages * PageCheck.PageSize;
        var machine = await c.CreateMachineAsync(ct: ct).ConfigureAwait(false);
        var setup = new RecipeSetup(machine.MachineId);
        var (vm, snap) = await TwoMappedProcessesAsync(c, machine.MachineId, Base, len, "guest RAM", "snapshot", ct).ConfigureAwait(false);
        // The guest ran before the snapshot: some pages written, the others never touched.
        var rng = new Random(unchecked((int)ctx.Options.Seed));
        var touched = Enumerable.Range(0, pages).Where(_ => rng.NextDouble() < 0.6).ToList();
        await new ThreadGuest(c).RunAsync(new GuestPlan(vm, Base, pages) { Ops = touched.Count, WriteRatio = 1, Pattern = AccessPattern.Sequential, WritablePages = touched }, ct).ConfigureAwait(false);
        // Nothing writes the guest's memory until the handler armed the protection: this is its content at the snapshot instant.
        setup.Private["instant"] = await PageCheck.ImagesAsync(c, vm, Base, pages, ct).ConfigureAwait(false);
        setup.State["vm"] = vm.ToString(CultureInfo.InvariantCulture);
        setup.State["snap"] = snap.ToString(CultureInfo.InvariantCulture);
        setup.State["base"] = Base.ToString(CultureInfo.InvariantCulture);
        setup.State["pages"] = pages.ToString(CultureInfo.InvariantCulture);
        return setup;
    }

    public override Task RunRoleAsync(string role, RoleContext ctx, CancellationToken ct) => role switch
    {
        "handler" => HandlerAsync(ctx, ct),
        "guest" => GuestAsync(ctx, ct),
        _ => throw new ArgumentException($"background-snapshot has no role {role}", nameof(role)),
    };

    private static async Task GuestAsync(RoleContext ctx, CancellationToken ct)
    {
        await ctx.WaitAsync("armed", ct).ConfigureAwait(false);
        var pages = (int)ctx.Id("pages");
        var plan = new GuestPlan(ctx.Id("vm"), ctx.U64("base"), pages) { Threads = 2, Ops = pages, WriteRatio = 0.6, Seed = ctx.Options.Seed + 1, Stall = ctx.Options.Stall };
        PostcopyRecipe.ReportGuest(ctx.Report, await new WorkloadGuest(ctx.Client).RunAsync(plan, ct).ConfigureAwait(false));
    }

    private static async Task HandlerAsync(RoleContext ctx, CancellationToken ct)
    {
        var c = ctx.Client;
        var vm = ctx.Id("vm");
        var snap = ctx.Id("snap");
        var start = ctx.U64("base");
        var pages = (int)ctx.Id("pages");
        var len = (ulong)pages * PageCheck.PageSize;
        var (e, uffd) = await c.CreateUffdAsync(vm, ct: ct).ConfigureAwait(false);
        e.Expect("userfaultfd");
        var features = ctx.WrongHandler == "no-unpopulated" ? 0 : FeatureWpUnpopulated;
        (await c.ApiAsync(uffd, features, ct: ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_API");
        (await c.RegisterAsync(uffd, start, len, 2, ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_REGISTER WP");
        (await c.WriteprotectAsync(uffd, start, len, 1, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT");
        await ctx.SignalAsync("armed").ConfigureAwait(false);

        var saved = new bool[pages];
        var left = pages;
        ulong Addr(int p) => start + ((ulong)p * PageCheck.PageSize);
        // Saves page p into the snapshot: process_vm_readv from the guest into the snapshot process.
        async Task SaveAsync(int p)
        {
            if (saved[p])
                return;
            var iov = new Iovec { Base = Addr(p), Len = PageCheck.PageSize };
            var r = await c.ProcessVmReadvAsync(snap, vm, [iov], [iov], ct: ct).ConfigureAwait(false);
            r.Errno.Expect("process_vm_readv");
            saved[p] = true;
            left--;
            ctx.Report.Add("pages-saved");
            ctx.Report.Add("bytes-saved", r.Transferred);
        }
        async Task UnprotectAsync(int p)
        {
            (await c.WriteprotectAsync(uffd, Addr(p), PageCheck.PageSize, 0, ct).ConfigureAwait(false)).Expect("UFFDIO_WRITEPROTECT (un-protect)");
            ctx.Report.Add("unprotects");
        }

        await using (var session = await c.ServeAsync(uffd, ct: ct).ConfigureAwait(false))
        {
            var next = 0;
            // The copy's bandwidth (QEMU's max-bandwidth), in pages per second: --set copy-rate=N (0: unlimited).
            var rate = double.Parse(ctx.Options.Setting("copy-rate", "500"), CultureInfo.InvariantCulture);
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var copied = 0;
            while (left > 0)
            {
                if (session.Messages.TryRead(out var batch))
                {
                    foreach (var m in batch)
                    {
                        if (m.Pagefault is not { Wp: true } pf)
                            continue;
                        ctx.Report.Add("wp-faults");
                        var p = (int)(((pf.Address & ~0xfffUL) - start) / PageCheck.PageSize);
                        if (ctx.WrongHandler == "unprotect-first")
                        {
                            // WRONG: the un-protect wakes the writer, whose write lands before the save reads the page.
                            await UnprotectAsync(p).ConfigureAwait(false);
                            await SaveAsync(p).ConfigureAwait(false);
                        }
                        else
                        {
                            await SaveAsync(p).ConfigureAwait(false);
                            await UnprotectAsync(p).ConfigureAwait(false);
                        }
                    }
                    continue;
                }
                // The background copy: the next page not saved yet, at its bandwidth.
                while (next < pages && saved[next])
                    next++;
                var due = rate > 0 ? TimeSpan.FromSeconds(copied / rate) - clock.Elapsed : TimeSpan.Zero;
                if (next < pages && due > TimeSpan.Zero)
                {
                    await Task.WhenAny(session.Messages.WaitToReadAsync(ct).AsTask(), Task.Delay(due, ct)).ConfigureAwait(false);
                    continue;
                }
                if (next < pages)
                {
                    copied++;
                    await SaveAsync(next).ConfigureAwait(false);
                    await UnprotectAsync(next).ConfigureAwait(false);
                }
            }
        }
        // Every page saved and un-protected: the snapshot is complete.
        (await c.UnregisterAsync(uffd, start, len, ct).ConfigureAwait(false)).Expect("UFFDIO_UNREGISTER");
        (await c.CloseUffdAsync(uffd, ct).ConfigureAwait(false)).Expect("close");
    }

    public override async Task<RecipeCheck> CheckAsync(RecipeContext ctx, RecipeSetup setup, RoleReport report, CancellationToken ct)
    {
        var pages = int.Parse(setup.State["pages"], CultureInfo.InvariantCulture);
        var instant = (PageImage[])setup.Private["instant"];
        var snap = await PageCheck.ImagesAsync(ctx.Client, long.Parse(setup.State["snap"], CultureInfo.InvariantCulture), Base, pages, ct).ConfigureAwait(false);
        var bytes = PageCheck.Compare("snapshot vs guest memory at the snapshot instant", Base, instant, snap);
        if (report.Get("pages-saved") != pages)
            return RecipeCheck.Fail($"the handler saved {report.Get("pages-saved")} of {pages} pages; {bytes}");
        var planned = report.Get("guest-accesses-planned");
        var done = report.Get("guest-accesses-done");
        if (planned == 0 || done < planned)
            return RecipeCheck.Fail($"the guest completed {done} of {planned} accesses; {bytes}");
        return bytes;
    }
}
