using System.Globalization;
using UffdGrpc.Mm;

namespace UffdGrpc.Benchmarks;

/// <summary>
/// The allocation checks <c>.ci/run</c> runs (bytes, never timings): each range operation
/// allocates the same managed bytes over 512 pages as over 16,384 — nothing per PTE it
/// visits — and a page-table lookup allocates nothing. Counted with
/// <see cref="GC.GetAllocatedBytesForCurrentThread"/> around calls on this thread, after
/// two warm-up calls (tiering and first-use caches allocate once).
/// </summary>
public static class AllocationGate
{
    private const int Small = 512, Large = 16384;

    private static long BytesPerCall(Action a)
    {
        a();
        a();
        const int n = 4;
        var before = GC.GetAllocatedBytesForCurrentThread();
        for (var i = 0; i < n; i++)
            a();
        return (GC.GetAllocatedBytesForCurrentThread() - before) / n;
    }

    private sealed record Check(string Name, Func<PopulatedRange, Action> Op, UffdFeatures Features = UffdFeatures.None, bool Register = false);

    private static readonly Check[] s_checks =
    [
        new("change_protection MM_CP_UFFD_WP + RESOLVE", r => () =>
        {
            lock (r.K.Lock)
            {
                r.Mm.ChangeProtection(r.Vma, PopulatedRange.A, PopulatedRange.A + r.Len, CpFlags.UffdWp);
                r.Mm.ChangeProtection(r.Vma, PopulatedRange.A, PopulatedRange.A + r.Len, CpFlags.UffdWpResolve | CpFlags.TryChangeWritable);
            }
        }),
        new("UFFDIO_WRITEPROTECT WP + un-protect", r => () =>
        {
            r.Ctx!.Writeprotect(PopulatedRange.A, r.Len, Uapi.WriteprotectModeWp);
            r.Ctx.Writeprotect(PopulatedRange.A, r.Len, 0);
        }, Register: true),
        new("mprotect PROT_READ + back to RW", r => () =>
        {
            r.Mm.Mprotect(PopulatedRange.A, r.Len, Prot.Read);
            r.Mm.Mprotect(PopulatedRange.A, r.Len, Prot.Read | Prot.Write);
        }),
        new("PAGEMAP_SCAN WP_MATCHING, nothing written", r =>
        {
            r.Ctx!.Writeprotect(PopulatedRange.A, r.Len, Uapi.WriteprotectModeWp);
            var arg = new PmScanArg
            {
                Flags = Uapi.PmScanWpMatching | Uapi.PmScanCheckWpasync, Start = PopulatedRange.A, End = PopulatedRange.A + r.Len,
                VecLen = 512, CategoryMask = Uapi.PageIsWritten, ReturnMask = Uapi.PageIsWritten,
            };
            return () => r.Mm.PagemapScan(arg);
        }, UffdFeatures.WpAsync | UffdFeatures.WpUnpopulated, true),
    ];

    /// <summary>Runs every check, prints one line each; 0 when all pass, 1 otherwise.</summary>
    public static int Run(TextWriter o)
    {
        var inv = CultureInfo.InvariantCulture;
        var failed = 0;
        foreach (var c in s_checks)
        {
            var small = BytesPerCall(c.Op(new PopulatedRange(Small, c.Features, c.Register)));
            var large = BytesPerCall(c.Op(new PopulatedRange(Large, c.Features, c.Register)));
            var perPte = (double)(large - small) / (Large - Small);
            var ok = large <= small;
            failed += ok ? 0 : 1;
            o.WriteLine(string.Create(inv, $"{(ok ? "PASS" : "FAIL")} {c.Name}: {small} B per call over {Small} pages, {large} B over {Large} pages ({perPte:F3} B per PTE visited; budget 0)"));
        }
        var r = new PopulatedRange(Small);
        var lookup = BytesPerCall(() =>
        {
            for (var p = 0UL; p < Small; p++)
                r.Mm.PageTable.GetPte(PopulatedRange.A + (p * PopulatedRange.Pg));
        });
        failed += lookup == 0 ? 0 : 1;
        o.WriteLine(string.Create(inv, $"{(lookup == 0 ? "PASS" : "FAIL")} page-table lookup (GetPte x {Small}): {lookup} B (budget 0)"));
        o.WriteLine(failed == 0 ? "allocation gate: all checks passed" : $"allocation gate: {failed} check(s) failed");
        return failed == 0 ? 0 : 1;
    }
}
