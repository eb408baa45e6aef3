using BenchmarkDotNet.Attributes;
using UffdGrpc.Mm;

namespace UffdGrpc.Benchmarks;

/// <summary>The userfaultfd ioctls and PAGEMAP_SCAN over a populated 64 MiB range; one operation = one page.</summary>
[MemoryDiagnoser]
public class UserfaultfdBenchmarks
{
    private const int Pages = 16384;
    private PopulatedRange _wp = null!;
    private PopulatedRange _async = null!;
    private PmScanArg _scan = null!;

    [GlobalSetup]
    public void Setup()
    {
        _wp = new PopulatedRange(Pages, registerWp: true);
        _async = new PopulatedRange(Pages, UffdFeatures.WpAsync | UffdFeatures.WpUnpopulated, registerWp: true);
        _async.Ctx!.Writeprotect(PopulatedRange.A, _async.Len, Uapi.WriteprotectModeWp);
        _scan = new PmScanArg
        {
            Flags = Uapi.PmScanWpMatching | Uapi.PmScanCheckWpasync,
            Start = PopulatedRange.A,
            End = PopulatedRange.A + _async.Len,
            VecLen = 8192,
            CategoryMask = Uapi.PageIsWritten,
            ReturnMask = Uapi.PageIsWritten,
        };
    }

    /// <summary>UFFDIO_WRITEPROTECT(WP) then (0) over the range: two PTE visits per page.</summary>
    [Benchmark(OperationsPerInvoke = 2 * Pages)]
    public Errno WriteprotectAndUnprotect()
    {
        _wp.Ctx!.Writeprotect(PopulatedRange.A, _wp.Len, Uapi.WriteprotectModeWp);
        return _wp.Ctx.Writeprotect(PopulatedRange.A, _wp.Len, 0);
    }

    /// <summary>mprotect(PROT_READ) then back to read-write over the range.</summary>
    [Benchmark(OperationsPerInvoke = 2 * Pages)]
    public Errno MprotectReadAndBack()
    {
        _wp.Mm.Mprotect(PopulatedRange.A, _wp.Len, Prot.Read);
        return _wp.Mm.Mprotect(PopulatedRange.A, _wp.Len, Prot.Read | Prot.Write);
    }

    /// <summary>PAGEMAP_SCAN with PM_SCAN_WP_MATCHING over a WP_ASYNC range with 64 pages written (collect and re-arm).</summary>
    [Benchmark(OperationsPerInvoke = Pages)]
    public int PagemapScanCollectAndRearm()
    {
        for (var p = 0UL; p < Pages; p += Pages / 64)
            _async.Run(new AccessOp(PopulatedRange.A + (p * PopulatedRange.Pg), true, 0, 1, AccessOrigin.User));
        return _async.Mm.PagemapScan(_scan).Regions.Count;
    }
}
