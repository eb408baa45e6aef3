using System.Globalization;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes.SnapshotRestore;

/// <summary>
/// The minor-clones variant: N clones of one sealed memfd restored with MINOR + CONTINUE
/// (each maps the memfd privately: CONTINUE maps the shared page-cache page read-only, a
/// write copies it), beside N clones restored with COPY into anonymous memory, every clone
/// running the same guest as its twin. Both sets are checked byte for byte; the figures are
/// the distinct frames each set holds (pagemap PFNs), as ejc3/fcvm#721 and
/// cloud-hypervisor#8514 compare them.
/// </summary>
public sealed partial class SnapshotRestoreRecipe
{
    private static IEnumerable<(string Kind, int Index, long Mm, long Uffd)> Clones(IReadOnlyDictionary<string, string> state)
    {
        var n = int.Parse(state["clones"], CultureInfo.InvariantCulture);
        for (var i = 0; i < n; i++)
        {
            foreach (var kind in (string[])["minor", "copy"])
                yield return (kind, i, long.Parse(state[$"{kind}.{i}.mm"], CultureInfo.InvariantCulture), long.Parse(state[$"{kind}.{i}.uffd"], CultureInfo.InvariantCulture));
        }
    }

    /// <summary>One handler process serving every clone: UFFDIO_CONTINUE for a MINOR clone's fault, the COPY handler for a COPY clone.</summary>
    private static async Task ClonesHandlerAsync(RoleContext ctx, CancellationToken ct)
    {
        var shape = Shape.Of(ctx.Options);
        await ctx.WaitAsync("snapshot", ct).ConfigureAwait(false);
        var snapshot = await ReadSnapshotAsync(ctx.Client, ctx.MachineId, ctx.Id("file"), shape.Len, ct).ConfigureAwait(false);
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var done = ctx.WaitAsync("guest-done", ct).ContinueWith(_ => stop.Cancel(), TaskScheduler.Default);
        var copyHandlers = new List<SnapshotHandler>();
        var serving = new List<Task>();
        long continues = 0;
        foreach (var (kind, _, _, uffd) in Clones(ctx.State))
        {
            if (kind == "copy")
            {
                var h = new SnapshotHandler(ctx.Client, uffd, Base, snapshot, SnapshotHandlerKind.Firecracker);
                copyHandlers.Add(h);
                serving.Add(h.RunAsync(stop.Token));
                continue;
            }
            var loop = new FaultHandlerLoop(ctx.Client, uffd)
            {
                OnResult = r =>
                {
                    if (r.Errno == Errno.Unspecified)
                        Interlocked.Increment(ref continues);
                },
            };
            serving.Add(RunLoopAsync(loop, stop.Token));
        }
        await Task.WhenAll(serving).ConfigureAwait(false);
        ctx.Report.Add("minor-continues", continues);
        foreach (var h in copyHandlers)
            h.Stats.ReportTo(ctx.Report, "copy-");
    }

    private static async Task RunLoopAsync(FaultHandlerLoop loop, CancellationToken ct)
    {
        try
        {
            await loop.RunAsync(ct).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            // The guests are done.
        }
    }

    /// <summary>Every clone runs its guest (twins share a seed), then reads all of its memory.</summary>
    private static async Task ClonesGuestAsync(RoleContext ctx, CancellationToken ct)
    {
        try
        {
            var shape = Shape.Of(ctx.Options);
            await ctx.WaitAsync("snapshot", ct).ConfigureAwait(false);
            IGuest guest = new WorkloadGuest(ctx.Client);
            await Task.WhenAll(Clones(ctx.State).Select(async clone =>
            {
                var seed = ctx.Options.Seed + (ulong)clone.Index;
                var run = await guest.RunAsync(new GuestPlan(clone.Mm, Base, shape.Pages) { Ops = shape.Pages / 2, WriteRatio = 0.2, Seed = seed, Stall = ctx.Options.Stall }, ct).ConfigureAwait(false);
                Report(ctx.Report, $"{clone.Kind}{clone.Index}", run, 0);
                run = await guest.RunAsync(new GuestPlan(clone.Mm, Base, shape.Pages) { Ops = shape.Pages, WriteRatio = 0, Pattern = AccessPattern.Sequential, Stall = ctx.Options.Stall }, ct).ConfigureAwait(false);
                Report(ctx.Report, "scan", run, 0);
            })).ConfigureAwait(false);
        }
        finally
        {
            await ctx.SignalAsync("guest-done").ConfigureAwait(false);
        }
    }

    private static async Task<RecipeCheck> CheckClonesAsync(RecipeContext ctx, RecipeSetup setup, RoleReport report, Shape shape, byte[] snapshot, CancellationToken ct)
    {
        var c = ctx.Client;
        var frames = new Dictionary<string, HashSet<ulong>> { ["minor"] = [], ["copy"] = [] };
        RecipeCheck? failed = null;
        var clones = 0;
        foreach (var (kind, i, mm, _) in Clones(setup.State))
        {
            var expected = new PageImage[shape.Pages];
            for (var p = 0; p < shape.Pages; p++)
                expected[p] = Image(snapshot.AsSpan(p * (int)PageCheck.PageSize, (int)PageCheck.PageSize));
            Apply(expected, report, $"{kind}{i}", shape.Pages);
            var actual = await PageCheck.ImagesAsync(c, mm, Base, shape.Pages, ct).ConfigureAwait(false);
            var check = PageCheck.Compare($"{kind} clone {i} vs the snapshot with its writes", Base, expected, actual, requirePresent: true);
            if (!check.Passed)
                failed ??= check;
            foreach (var e in await c.PagemapAsync(mm, Base, (uint)shape.Pages, ct).ConfigureAwait(false))
            {
                if (e.Present)
                    frames[kind].Add(e.Pfn);
            }
            clones++;
        }
        report.Set("minor-clones-distinct-frames", frames["minor"].Count);
        report.Set("copy-clones-distinct-frames", frames["copy"].Count);
        var planned = report.Get("guest-accesses-planned");
        var done = report.Get("guest-accesses-done");
        if (failed is not null)
            return failed;
        if (planned == 0 || done < planned)
            return RecipeCheck.Fail($"the clones' guests completed {done} of {planned} accesses");
        return RecipeCheck.Pass($"{clones / 2} MINOR clones and {clones / 2} COPY clones equal the snapshot with their writes, byte for byte; distinct frames: MINOR+CONTINUE {frames["minor"].Count}, COPY {frames["copy"].Count} ({shape.Pages} pages per clone)");
    }
}
