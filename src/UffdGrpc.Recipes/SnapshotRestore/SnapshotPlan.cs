using UffdGrpc.Recipes.RestoreCommon;

namespace UffdGrpc.Recipes.SnapshotRestore;

/// <summary>
/// What the restored guest does, from a seed: (A) before the handler connects, each vCPU
/// faults on one page (vCPU 0 inside the first balloon range) and the balloon releases that
/// range, so the handler's first read holds PAGEFAULT before REMOVE for the same page;
/// (B) every vCPU reads and writes its own pages (page index ≡ vCPU mod vCPUs, so the end
/// state does not depend on how the vCPUs interleave); (C) the balloon releases a second
/// range, and the vCPUs touch it again.
/// </summary>
public sealed record SnapshotPlan(int Pages, int Vcpus, ulong Base, IReadOnlyList<GuestTouch> PhaseA, (ulong Start, ulong Len) Balloon1, IReadOnlyList<IReadOnlyList<GuestTouch>> PhaseB, (ulong Start, ulong Len) Balloon2, IReadOnlyList<IReadOnlyList<GuestTouch>> PhaseC)
{
    public static SnapshotPlan Create(int pages, int vcpus, ulong guestBase, int seed, Func<int, bool> zeroInSnapshot)
    {
        if (pages < 64 || vcpus < 1)
            throw new ArgumentOutOfRangeException(nameof(pages), "at least 64 pages and one vCPU");
        var rng = new Random(seed);
        ulong At(int page) => guestBase + (ulong)page * 4096;
        // Balloon ranges: a quarter of the way in and three quarters in, 1/16 of memory each.
        var len = pages / 16;
        var b1 = pages / 4;
        var b2 = pages * 3 / 4;
        // vCPU 0's page holds data in the snapshot, so serving it from there is visible.
        var inBalloon = Enumerable.Range(b1, len).First(p => !zeroInSnapshot(p));
        var phaseA = Enumerable.Range(0, vcpus).Select(v => new GuestTouch(At(v == 0 ? inBalloon : b1 + len + 1 + v), false, 0)).ToList();
        var phaseB = new List<IReadOnlyList<GuestTouch>>();
        var phaseC = new List<IReadOnlyList<GuestTouch>>();
        for (var v = 0; v < vcpus; v++)
        {
            var mine = Enumerable.Range(0, pages).Where(p => p % vcpus == v).OrderBy(_ => rng.Next()).ToList();
            phaseB.Add(mine.Select(p => new GuestTouch(At(p), rng.Next(2) == 0, 1)).ToList());
            phaseC.Add(Enumerable.Range(b2, len).Where(p => p % vcpus == v).Select(p => new GuestTouch(At(p), rng.Next(3) == 0, 2)).ToList());
        }
        return new SnapshotPlan(pages, vcpus, guestBase, phaseA, (At(b1), (ulong)len * 4096), phaseB, (At(b2), (ulong)len * 4096), phaseC);
    }
}
