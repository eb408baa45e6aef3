using System.Diagnostics;
using static UffdGrpc.Cli.Bench.Native;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// Measures the host kernel live for the operations the bench compares the model with (root
/// and userfaultfd needed): UFFDIO_WRITEPROTECT and mprotect over a populated 1 GiB range of
/// 4 KiB pages, WRITEPROTECT over 1 GiB of THPs, PAGEMAP_SCAN with PM_SCAN_WP_MATCHING on a
/// WP_ASYNC range, and the WP fault → handler → resume round trip on one CPU and across two.
/// Each figure is the median of several rounds.
/// </summary>
internal static class KernelProbe
{
    private const long Gib = 1L << 30;
    private const long Page = 4096;
    private const long PagesPerGib = Gib / Page;
    private const long PmdSize = 2L << 20;

    /// <summary>Why the host cannot be measured, or null when it can (a userfaultfd opens).</summary>
    public static string? Unavailable()
    {
        if (!OperatingSystem.IsLinux() || !Environment.Is64BitProcess || System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture != System.Runtime.InteropServices.Architecture.X64)
            return "not Linux x86-64";
        var fd = (int)syscall(SysUserfaultfd, OCloexec | ONonblock);
        if (fd < 0)
            return $"userfaultfd: errno {Errno} (root or vm.unprivileged_userfaultfd needed)";
        close(fd);
        return null;
    }

    /// <summary>Live figures keyed by the bench's row ids (ns per page, per PMD, or µs).</summary>
    public static Dictionary<string, double> Measure(int rounds)
    {
        var r = new Dictionary<string, double>();
        Measure4K(r, rounds);
        MeasureThp(r, rounds);
        MeasureScan(r, rounds);
        var (p50one, p99one) = RoundTrip(0, 0, 4000);
        r["rt.one"] = p50one;
        r["rt.one.p99"] = p99one;
        return r;
    }

    /// <summary>The WP fault round trip with the handler on the other vCPU: p50 and p99 in µs.</summary>
    public static (double P50, double P99) CrossRoundTrip() => RoundTrip(0, 1, 4000);

    private static nint MapPopulated(long len, bool thp, out nint unmapBase, out long unmapLen)
    {
        unmapLen = len + PmdSize;
        unmapBase = mmap(0, (nuint)unmapLen, ProtRead | ProtWrite, MapPrivate | MapAnonymous | MapNoreserve, -1, 0);
        if (unmapBase == -1)
            throw new InvalidOperationException($"mmap: errno {Errno}");
        var a = (nint)(((long)unmapBase + PmdSize - 1) & ~(PmdSize - 1));
        Check(madvise(a, (nuint)len, thp ? MadvHugepage : MadvNohugepage), "madvise");
        Check(madvise(a, (nuint)len, MadvPopulateWrite), "MADV_POPULATE_WRITE");
        return a;
    }

    private static int OpenUffd(bool blocking, ulong features)
    {
        var fd = (int)syscall(SysUserfaultfd, OCloexec | (blocking ? 0 : ONonblock));
        if (fd < 0)
            throw new InvalidOperationException($"userfaultfd: errno {Errno}");
        var api = new UffdioApi { Api = UffdApi, Features = features };
        Check(IoctlApi(fd, UffdioApiCmd, ref api), "UFFDIO_API");
        return fd;
    }

    private static void Register(int fd, nint a, long len)
    {
        var reg = new UffdioRegister { Start = (ulong)a, Len = (ulong)len, Mode = RegisterModeWp };
        Check(IoctlRegister(fd, UffdioRegisterCmd, ref reg), "UFFDIO_REGISTER");
    }

    private static long Wp(int fd, nint a, long len, ulong mode)
    {
        var wp = new UffdioWriteprotect { Start = (ulong)a, Len = (ulong)len, Mode = mode };
        var s = Stopwatch.GetTimestamp();
        Check(IoctlWriteprotect(fd, UffdioWriteprotectCmd, ref wp), "UFFDIO_WRITEPROTECT");
        return Stopwatch.GetTimestamp() - s;
    }

    private static void Measure4K(Dictionary<string, double> r, int rounds)
    {
        var a = MapPopulated(Gib, false, out var b, out var bl);
        try
        {
            var fd = OpenUffd(false, 0);
            try
            {
                Register(fd, a, Gib);
                var prot = new double[rounds];
                var unprot = new double[rounds];
                Wp(fd, a, Gib, WriteprotectModeWp);
                Wp(fd, a, Gib, 0);
                for (var i = 0; i < rounds; i++)
                {
                    prot[i] = Ns(Wp(fd, a, Gib, WriteprotectModeWp)) / PagesPerGib;
                    unprot[i] = Ns(Wp(fd, a, Gib, 0)) / PagesPerGib;
                }
                r["wp.protect"] = Median(prot);
                r["wp.unprotect"] = Median(unprot);
            }
            finally
            {
                close(fd);
            }
            var ro = new double[rounds];
            var rw = new double[rounds];
            for (var i = 0; i < rounds; i++)
            {
                var s = Stopwatch.GetTimestamp();
                Check(mprotect(a, (nuint)Gib, ProtRead), "mprotect");
                var m = Stopwatch.GetTimestamp();
                Check(mprotect(a, (nuint)Gib, ProtRead | ProtWrite), "mprotect");
                var e = Stopwatch.GetTimestamp();
                ro[i] = Ns(m - s) / PagesPerGib;
                rw[i] = Ns(e - m) / PagesPerGib;
            }
            r["mprotect.ro"] = Median(ro);
            r["mprotect.rw"] = Median(rw);
        }
        finally
        {
            munmap(b, (nuint)bl);
        }
    }

    private static void MeasureThp(Dictionary<string, double> r, int rounds)
    {
        var a = MapPopulated(Gib, true, out var b, out var bl);
        try
        {
            // Without THPs (transparent_hugepage disabled, memory too fragmented) this would
            // time 4 KiB pages: leave the row to the reference figure.
            if (AnonHugePagesKib() < (Gib >> 10) / 2)
                return;
            var fd = OpenUffd(false, 0);
            try
            {
                Register(fd, a, Gib);
                var prot = new double[rounds];
                Wp(fd, a, Gib, WriteprotectModeWp);
                Wp(fd, a, Gib, 0);
                for (var i = 0; i < rounds; i++)
                {
                    prot[i] = Ns(Wp(fd, a, Gib, WriteprotectModeWp)) / (Gib / PmdSize);
                    Wp(fd, a, Gib, 0);
                }
                r["thp.protect"] = Median(prot);
            }
            finally
            {
                close(fd);
            }
        }
        finally
        {
            munmap(b, (nuint)bl);
        }
    }

    /// <summary>AnonHugePages of /proc/self/smaps_rollup, in KiB.</summary>
    private static long AnonHugePagesKib()
    {
        foreach (var line in File.ReadLines("/proc/self/smaps_rollup"))
        {
            if (line.StartsWith("AnonHugePages:", StringComparison.Ordinal))
                return long.Parse(line.AsSpan(14).Trim().TrimEnd("kB").Trim(), System.Globalization.CultureInfo.InvariantCulture);
        }
        return 0;
    }

    /// <summary>PAGEMAP_SCAN, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC over a WP_ASYNC range: every page written (the full walk), and 4,096 written pages spread over 1 GiB.</summary>
    private static void MeasureScan(Dictionary<string, double> r, int rounds)
    {
        var a = MapPopulated(Gib, false, out var b, out var bl);
        var pm = Open("/proc/self/pagemap", ORdonly);
        var fd = OpenUffd(false, FeatureWpAsync | FeatureWpUnpopulated);
        var vec = System.Runtime.InteropServices.Marshal.AllocHGlobal(24 * 8192);
        try
        {
            Check(pm < 0 ? -1 : 0, "open /proc/self/pagemap");
            Register(fd, a, Gib);
            Wp(fd, a, Gib, WriteprotectModeWp);
            long Scan()
            {
                var arg = new PmScanArg
                {
                    Size = 96,
                    Flags = PmScanWpMatching | PmScanCheckWpasync,
                    Start = (ulong)a,
                    End = (ulong)(a + (nint)Gib),
                    Vec = (ulong)vec,
                    VecLen = 8192,
                    CategoryMask = PageIsWritten,
                    ReturnMask = PageIsWritten,
                };
                var s = Stopwatch.GetTimestamp();
                if (IoctlScan(pm, PagemapScanCmd, ref arg) < 0)
                    throw new InvalidOperationException($"PAGEMAP_SCAN: errno {Errno}");
                return Stopwatch.GetTimestamp() - s;
            }
            void Dirty(long stride)
            {
                for (long p = 0; p < PagesPerGib; p += stride)
                    memset(a + (nint)(p * Page), 1, 1);
            }
            var full = new double[rounds];
            var sparse = new double[rounds];
            Dirty(1);
            Scan();
            for (var i = 0; i < rounds; i++)
            {
                Dirty(1);
                full[i] = Ns(Scan()) / PagesPerGib;
                Dirty(PagesPerGib / 4096);
                sparse[i] = Ns(Scan()) / PagesPerGib;
            }
            r["scan.full"] = Median(full);
            r["scan.sparse"] = Median(sparse);
        }
        finally
        {
            System.Runtime.InteropServices.Marshal.FreeHGlobal(vec);
            close(fd);
            if (pm >= 0)
                close(pm);
            munmap(b, (nuint)bl);
        }
    }

    /// <summary>
    /// A thread on CPU <paramref name="faultCpu"/> write-protects a page and writes it; a
    /// handler on CPU <paramref name="handlerCpu"/> blocks in read(2), un-protects the page
    /// (waking the writer). Timed from the write to its return; p50 and p99 in µs.
    /// </summary>
    private static (double P50, double P99) RoundTrip(int faultCpu, int handlerCpu, int n)
    {
        var b = mmap(0, (nuint)(2 * Page), ProtRead | ProtWrite, MapPrivate | MapAnonymous, -1, 0);
        if (b == -1)
            throw new InvalidOperationException($"mmap: errno {Errno}");
        var stopPage = b + (nint)Page;
        memset(b, 0, (nuint)(2 * Page));
        var fd = OpenUffd(true, 0);
        var lat = new double[n];
        Exception? failure = null;
        try
        {
            Register(fd, b, 2 * Page);
            var handler = new Thread(() =>
            {
                try
                {
                    Pin(handlerCpu);
                    var msg = default(UffdMsg);
                    while (true)
                    {
                        if (read(fd, ref msg, 32) != 32)
                            throw new InvalidOperationException($"read uffd: errno {Errno}");
                        var page = (nint)(msg.Address & ~(ulong)(Page - 1));
                        Wp(fd, page, Page, 0);
                        if (page == stopPage)
                            return;
                    }
                }
                catch (Exception e)
                {
                    failure = e;
                }
            })
            { IsBackground = true, Name = "uffd handler" };
            var faulter = new Thread(() =>
            {
                Pin(faultCpu);
                var warm = n / 4;
                for (var i = -warm; i < n; i++)
                {
                    Wp(fd, b, Page, WriteprotectModeWp);
                    var s = Stopwatch.GetTimestamp();
                    memset(b, i & 0xff, 1);
                    var e = Stopwatch.GetTimestamp();
                    if (i >= 0)
                        lat[i] = Ns(e - s) / 1000;
                }
                Wp(fd, stopPage, Page, WriteprotectModeWp);
                memset(stopPage, 1, 1);
            })
            { IsBackground = true, Name = "uffd faulter" };
            handler.Start();
            faulter.Start();
            faulter.Join();
            handler.Join();
        }
        finally
        {
            close(fd);
            munmap(b, (nuint)(2 * Page));
        }
        if (failure is not null)
            throw new InvalidOperationException("round trip handler failed", failure);
        Array.Sort(lat);
        return (lat[n / 2], lat[(n * 99 / 100) - 1]);
    }

    private static void Pin(int cpu)
    {
        var mask = 1UL << cpu;
        sched_setaffinity(0, sizeof(ulong), ref mask);
    }

    private static double Ns(long ticks) => ticks * (1e9 / Stopwatch.Frequency);

    private static double Median(double[] xs)
    {
        var c = (double[])xs.Clone();
        Array.Sort(c);
        return c[c.Length / 2];
    }

    private static void Check(int rc, string what)
    {
        if (rc < 0)
            throw new InvalidOperationException($"{what}: errno {Errno}");
    }
}
