using System.Diagnostics;

namespace UffdGrpc.Mm;

/// <summary>How a guest workload picks its pages (uffd.v1.WorkloadPattern).</summary>
public enum GuestPattern
{
    /// <summary>Each thread walks its slice of the range page by page, wrapping around.</summary>
    Sequential,
    /// <summary>Each access picks a page of the range uniformly.</summary>
    Uniform,
    /// <summary>Pages by rank with a Zipf law, ranks mapped to pages by a seeded permutation.</summary>
    HotsetZipf,
    /// <summary>90 % of accesses to a seeded hot window of 10 % of the pages, 10 % to the rest.</summary>
    Hotset9010,
    /// <summary>QEMU's tests/migration guest: increment byte 0 of every page of the slice, in a loop.</summary>
    QemuMigrationTest,
}

/// <summary>What one guest access does.</summary>
public enum GuestAccessKind
{
    /// <summary>Loads bytes 0..15 of the page.</summary>
    Read,
    /// <summary>Stores the whole page: <see cref="GuestPagePattern"/> of its address and next generation.</summary>
    WritePattern,
    /// <summary>incb of byte 0 (a read-modify-write store, faulting as a write).</summary>
    Increment,
}

/// <summary>
/// A guest workload's parameters (uffd.v1.WorkloadSpec), validated. Everything a thread does
/// follows from it, its seed and the thread's index: the same spec gives the same accesses.
/// </summary>
public sealed record GuestWorkloadSpec(ulong Start, ulong Length, GuestPattern Pattern, ulong Seed, int Threads = 1,
    double WriteRatio = 0, double DirtyRate = 0, TimeSpan Duration = default, ulong OpCount = 0, double ZipfExponent = 1.0)
{
    /// <summary>The largest range a Zipf workload covers (its CDF holds a double per page).</summary>
    public const ulong MaxZipfPages = 1 << 20;

    public ulong Pages => Length / Kernel.PageSize;

    /// <summary>Why the spec is invalid (null when it is valid), naming the field.</summary>
    public (string Field, string Why)? Invalid()
    {
        if (Start % Kernel.PageSize != 0)
            return ("start", "page-aligned");
        if (Length == 0 || Length % Kernel.PageSize != 0)
            return ("length", "page-aligned and above 0");
        if (Start + Length < Start || Start + Length > Kernel.TaskSize)
            return ("length", "the range must lie below TASK_SIZE");
        if (Threads < 1)
            return ("threads", "at least 1");
        if ((Pattern is GuestPattern.Sequential or GuestPattern.QemuMigrationTest) && (ulong)Threads > Pages)
            return ("threads", "at most one thread per page of the range (each walks a slice)");
        if (double.IsNaN(WriteRatio) || WriteRatio < 0 || WriteRatio > 1)
            return ("write_ratio", "between 0 and 1");
        if (double.IsNaN(DirtyRate) || double.IsInfinity(DirtyRate) || DirtyRate < 0)
            return ("dirty_rate_pages_per_sec", "0 or a positive rate");
        if (double.IsNaN(ZipfExponent) || ZipfExponent <= 0 || ZipfExponent > 10)
            return ("zipf_exponent", "above 0 and at most 10");
        if (Pattern == GuestPattern.HotsetZipf && Pages > MaxZipfPages)
            return ("length", $"HOTSET_ZIPF covers at most {MaxZipfPages} pages");
        return null;
    }

    /// <summary>Accesses thread <paramref name="index"/> makes (the first threads take the remainder; ulong.MaxValue: no limit).</summary>
    public ulong OpsOfThread(int index) =>
        OpCount == 0 ? ulong.MaxValue : (OpCount / (ulong)Threads) + ((ulong)index < OpCount % (ulong)Threads ? 1UL : 0);

    /// <summary>Accesses per second for the whole workload (0: unpaced): the dirty rate over the write ratio.</summary>
    public double AccessesPerSecond =>
        DirtyRate <= 0 ? 0 : Pattern == GuestPattern.QemuMigrationTest || WriteRatio <= 0 ? DirtyRate : DirtyRate / WriteRatio;

    /// <summary>
    /// When a thread's access <paramref name="n"/> is due, in <see cref="Stopwatch"/> ticks after
    /// the start: each thread takes an equal share of the rate (0 when unpaced).
    /// </summary>
    public long DueTicks(ulong n)
    {
        var rate = AccessesPerSecond;
        return rate <= 0 ? 0 : (long)Math.Min(n * (double)Threads / rate * Stopwatch.Frequency, long.MaxValue / 2);
    }

    /// <summary>Thread <paramref name="index"/>'s slice [first, end) of the range's pages (SEQUENTIAL, QEMU).</summary>
    public (ulong First, ulong End) SliceOf(int index) =>
        (Pages * (ulong)index / (ulong)Threads, Pages * (ulong)(index + 1) / (ulong)Threads);
}

/// <summary>
/// A guest workload's seeded page sequence, shared by its threads: the Zipf CDF and rank
/// permutation, the hot window. Each thread draws from its own <see cref="GuestAccessStream"/>.
/// </summary>
public sealed class GuestWorkloadPlan
{
    private readonly double[]? _zipfCdf;
    private readonly ulong _permMul;
    private readonly ulong _permAdd;

    public GuestWorkloadPlan(GuestWorkloadSpec spec)
    {
        Spec = spec;
        var n = spec.Pages;
        var s = spec.Seed ^ 0x5EED_0F_6E57UL;
        HotPages = Math.Max(1, n / 10);
        HotFirst = n > HotPages ? SplitMix64.Next(ref s) % (n - HotPages + 1) : 0;
        // A multiplier coprime with n makes rank → (rank·a + b) mod n a permutation.
        _permMul = (SplitMix64.Next(ref s) % n) | 1;
        while (Gcd(_permMul, n) != 1)
            _permMul += 2;
        _permAdd = SplitMix64.Next(ref s) % n;
        if (spec.Pattern == GuestPattern.HotsetZipf)
        {
            _zipfCdf = new double[n];
            var sum = 0.0;
            for (ulong k = 0; k < n; k++)
            {
                sum += 1.0 / Math.Pow(k + 1, spec.ZipfExponent);
                _zipfCdf[k] = sum;
            }
            for (ulong k = 0; k < n; k++)
                _zipfCdf[k] /= sum;
        }
    }

    public GuestWorkloadSpec Spec { get; }
    /// <summary>HOTSET_90_10's hot window: its first page index and size.</summary>
    public ulong HotFirst { get; }
    public ulong HotPages { get; }

    private static ulong Gcd(ulong a, ulong b)
    {
        while (b != 0)
            (a, b) = (b, a % b);
        return a;
    }

    /// <summary>The page index of Zipf rank <paramref name="u"/> (a uniform draw in [0, 1)).</summary>
    internal ulong ZipfPage(double u)
    {
        var i = Array.BinarySearch(_zipfCdf!, u);
        var rank = (ulong)(i >= 0 ? i : Math.Min(~i, _zipfCdf!.Length - 1));
        return (ulong)(((UInt128)rank * _permMul + _permAdd) % Spec.Pages);
    }

    /// <summary>Thread <paramref name="index"/>'s access sequence.</summary>
    public GuestAccessStream Stream(int index) => new(this, index);
}

/// <summary>One thread's seeded sequence of (page address, kind): a pure function of the spec, the seed and the thread's index.</summary>
public sealed class GuestAccessStream
{
    private readonly GuestWorkloadPlan _plan;
    private readonly ulong _first;
    private readonly ulong _end;
    private ulong _state;
    private ulong _cursor;

    internal GuestAccessStream(GuestWorkloadPlan plan, int index)
    {
        _plan = plan;
        var seedState = (ulong)(index + 1) * 0xA24B_AED4_963E_E407;
        _state = plan.Spec.Seed ^ SplitMix64.Next(ref seedState);
        (_first, _end) = plan.Spec.SliceOf(index);
        _cursor = _first;
    }

    private double NextDouble() => (SplitMix64.Next(ref _state) >> 11) * (1.0 / (1UL << 53));

    private ulong Below(ulong n) => SplitMix64.Next(ref _state) % n;

    /// <summary>The next access: the page's address and what to do there.</summary>
    public (ulong Address, GuestAccessKind Kind) Next()
    {
        var spec = _plan.Spec;
        var n = spec.Pages;
        ulong page;
        switch (spec.Pattern)
        {
            case GuestPattern.Sequential:
            case GuestPattern.QemuMigrationTest:
                page = _cursor;
                _cursor = _cursor + 1 == _end ? _first : _cursor + 1;
                break;
            case GuestPattern.Uniform:
                page = Below(n);
                break;
            case GuestPattern.HotsetZipf:
                page = _plan.ZipfPage(NextDouble());
                break;
            default:
                var cold = n - _plan.HotPages;
                if (cold == 0 || NextDouble() < 0.9)
                {
                    page = _plan.HotFirst + Below(_plan.HotPages);
                }
                else
                {
                    var c = Below(cold);
                    page = c < _plan.HotFirst ? c : c + _plan.HotPages;
                }
                break;
        }
        var kind = spec.Pattern == GuestPattern.QemuMigrationTest ? GuestAccessKind.Increment
            : NextDouble() < spec.WriteRatio ? GuestAccessKind.WritePattern : GuestAccessKind.Read;
        return (spec.Start + (page * Kernel.PageSize), kind);
    }
}

/// <summary>
/// One access of a guest workload's thread, through the CPU path every access takes
/// (<see cref="Mm.AccessPage"/>: the MMU, then handle_mm_fault, sleeping in
/// handle_userfault when a uffd must resolve it, and retrying from the top when woken).
/// A write stores the page's next generation (<see cref="GuestPagePattern"/>), or for
/// QEMU's guest its byte 0 plus one; when it lands it takes the machine's next write
/// sequence number.
/// </summary>
public sealed class GuestAccessOp(ulong address, GuestAccessKind kind, byte[] buffer) : SyscallOp
{
    public ulong Address { get; } = address;
    public GuestAccessKind Kind { get; } = kind;
    /// <summary>A write: the generation (or for an increment the byte) it stored.</summary>
    public ulong Generation { get; private set; }
    /// <summary>A write: its machine-wide sequence number (<see cref="Kernel.WriteSeq"/>).</summary>
    public ulong Seq { get; private set; }
    /// <summary>The signal that ended the access, or None.</summary>
    public SigCode Signal { get; private set; }

    protected internal override bool Step()
    {
        FaultResult r;
        switch (Kind)
        {
            case GuestAccessKind.Read:
                r = Mm.AccessPage(Thread, Address, false, AccessOrigin.User, default, buffer.AsSpan(0, 16));
                break;
            case GuestAccessKind.WritePattern:
                {
                    // Under the lock from here to the store: the generation read now is the one stored.
                    var gen = Mm.GuestGenerations.GetValueOrDefault(Address) + 1;
                    GuestPagePattern.Fill(buffer.AsSpan(0, GuestPagePattern.PageSize), Address, gen);
                    r = Mm.AccessPage(Thread, Address, true, AccessOrigin.User, buffer.AsSpan(0, GuestPagePattern.PageSize), default);
                    if (r == FaultResult.Ok)
                    {
                        Mm.GuestGenerations[Address] = gen;
                        Generation = gen;
                    }
                    break;
                }
            default:
                {
                    // incb: the byte the store will find (a fault in between keeps the contents).
                    Span<byte> b = [0];
                    Mm.PeekBytes(Address, b);
                    b[0]++;
                    r = Mm.AccessPage(Thread, Address, true, AccessOrigin.User, b, default);
                    Generation = b[0];
                    break;
                }
        }
        switch (r)
        {
            case FaultResult.Ok:
                if (Kind != GuestAccessKind.Read)
                    Seq = Mm.Kernel.NextWriteSeq();
                return true;
            case FaultResult.Blocked:
                return false;
            default:
                Signal = Mm.SignalOf(r);
                return true;
        }
    }
}

public sealed partial class Mm
{
    /// <summary>Each page's last guest-workload generation (a workload write stores the next).</summary>
    internal Dictionary<ulong, ulong> GuestGenerations { get; } = [];
}
