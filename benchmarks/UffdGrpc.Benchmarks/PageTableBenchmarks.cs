using BenchmarkDotNet.Attributes;
using UffdGrpc.Mm;

namespace UffdGrpc.Benchmarks;

/// <summary>change_protection and the page-table walk over a populated 64 MiB range; one operation = one PTE.</summary>
[MemoryDiagnoser]
public class PageTableBenchmarks
{
    private const int Pages = 16384;
    private PopulatedRange _r = null!;

    [GlobalSetup]
    public void Setup() => _r = new PopulatedRange(Pages);

    /// <summary>change_protection(MM_CP_UFFD_WP) then MM_CP_UFFD_WP_RESOLVE: two PTE visits per page.</summary>
    [Benchmark(OperationsPerInvoke = 2 * Pages)]
    public long ChangeProtectionUffdWpAndResolve()
    {
        lock (_r.K.Lock)
        {
            return _r.Mm.ChangeProtection(_r.Vma, PopulatedRange.A, PopulatedRange.A + _r.Len, CpFlags.UffdWp)
                + _r.Mm.ChangeProtection(_r.Vma, PopulatedRange.A, PopulatedRange.A + _r.Len, CpFlags.UffdWpResolve | CpFlags.TryChangeWritable);
        }
    }

    /// <summary>GetPte of every page (a four-level lookup each).</summary>
    [Benchmark(OperationsPerInvoke = Pages)]
    public ulong GetPte()
    {
        ulong x = 0;
        for (var p = 0UL; p < Pages; p++)
            x ^= _r.Mm.PageTable.GetPte(PopulatedRange.A + (p * PopulatedRange.Pg)).Value;
        return x;
    }
}
