using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes.LazyRestore;

/// <summary>
/// What the restored tree does (the same on the lazy and on the eager copy). P first moves
/// region C to D (the REMAP is the daemon's first message: a task runs as soon as it is
/// restored), forks a child that touches a few pages and exits, and forks a child that
/// lives — all before the restorer's "restore finished" reaches the daemon, which only then
/// starts its background push (so the first child exits with pages still lazy, whatever the
/// timing); then P unmaps the start of B and releases (MADV_DONTNEED) a later part while the
/// push runs, reads the moved region, and P, its child and Q read and write their memory at
/// once (each task's accesses in order, so the end state does not depend on timing).
/// </summary>
public static class LazyWorkload
{
    private const ulong Page = PageCheck.PageSize;

    /// <summary>Runs the workload on P and Q; returns the tasks alive at the end by name.</summary>
    public static async Task<Dictionary<string, long>> RunAsync(UffdClient c, long p, long q, RecipeOptions o, Func<Task>? resumed, RoleReport report, CancellationToken ct)
    {
        IGuest guest = new WorkloadGuest(c);
        var seed = o.Seed;
        var pt = (await c.CreateThreadAsync(p, ct).ConfigureAwait(false)).ThreadId;
        var mremap = await c.StartOpAsync(pt, new ThreadOp { Mremap = new MremapOp { OldAddr = LazyRestoreRecipe.RegionC, Len = LazyRestoreRecipe.SmallPages * Page, NewAddr = LazyRestoreRecipe.RegionD } }, ct).ConfigureAwait(false);
        (await c.WaitOpAsync(mremap.OpId, ct).ConfigureAwait(false)).Errno.Expect("mremap");

        var f1 = await c.ForkAsync(p, pt, ct).ConfigureAwait(false);
        f1.Errno.Expect("fork");
        Account(report, await guest.RunAsync(Plan(f1.ChildMmId, LazyRestoreRecipe.RegionA, 8, 0.5, seed + 1, 1, o), ct).ConfigureAwait(false));
        await c.DestroyMmAsync(f1.ChildMmId, ct).ConfigureAwait(false);

        var f2 = await c.ForkAsync(p, pt, ct).ConfigureAwait(false);
        f2.Errno.Expect("fork");
        if (resumed is not null)
            await resumed().ConfigureAwait(false);
        (await c.MunmapAsync(p, LazyRestoreRecipe.RegionB, 16 * Page, pt, ct).ConfigureAwait(false)).Expect("munmap");
        (await c.MadviseAsync(p, LazyRestoreRecipe.RegionB + (32 * Page), 16 * Page, 4, pt, ct).ConfigureAwait(false)).Expect("MADV_DONTNEED");
        Account(report, await guest.RunAsync(Plan(p, LazyRestoreRecipe.RegionD, LazyRestoreRecipe.SmallPages, 0, seed, 1, o) with { Pattern = AccessPattern.Sequential }, ct).ConfigureAwait(false));

        async Task TaskAsync(params GuestPlan[] plans)
        {
            foreach (var plan in plans)
                Account(report, await guest.RunAsync(plan, ct).ConfigureAwait(false));
        }
        await Task.WhenAll(
            TaskAsync(Plan(p, LazyRestoreRecipe.RegionB + (16 * Page), LazyRestoreRecipe.SmallPages - 16, 0.5, seed + 2, 2, o), Plan(p, LazyRestoreRecipe.RegionA, 64, 0.3, seed + 3, 3, o)),
            TaskAsync(Plan(f2.ChildMmId, LazyRestoreRecipe.RegionA + (64 * Page), 64, 0.5, seed + 4, 4, o), Plan(f2.ChildMmId, LazyRestoreRecipe.RegionD, LazyRestoreRecipe.SmallPages, 0.3, seed + 5, 5, o)),
            TaskAsync(Plan(q, LazyRestoreRecipe.RegionA, 64, 0.5, seed + 6, 6, o))).ConfigureAwait(false);
        return new Dictionary<string, long>(StringComparer.Ordinal) { ["P"] = p, ["Q"] = q, ["P'"] = f2.ChildMmId };
    }

    private static GuestPlan Plan(long mm, ulong start, int pages, double writes, ulong seed, int generation, RecipeOptions o) =>
        new(mm, start, pages) { Ops = pages, WriteRatio = writes, Seed = seed, FirstGeneration = generation, Stall = o.Stall };

    private static void Account(RoleReport r, GuestRun run)
    {
        r.Add("guest-accesses-planned", run.Planned);
        r.Add("guest-accesses-done", run.Done);
        if (run.Stalled is { } s)
            r.Note(s);
    }
}
