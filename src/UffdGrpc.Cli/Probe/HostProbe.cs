using System.Globalization;
using System.Runtime.InteropServices;
using UffdGrpc.Scenarios;
using UffdGrpc.Scenarios.Host;
using static UffdGrpc.Cli.Bench.Native;

namespace UffdGrpc.Cli.Probe;

/// <summary>
/// Measures the host kernel for <c>uffdgrpc probe</c> with real syscalls and ioctls
/// (source-generated P/Invoke): userfaultfd(2) and UFFDIO_API, mmap of anon, memfd (shmem)
/// and MAP_HUGETLB|MAP_NORESERVE memory and UFFDIO_REGISTER in each mode, a read fault
/// looked up in /proc/self/pagemap and /proc/kpageflags, PAGEMAP_SCAN, /proc/self/smaps,
/// and the sysfs/procfs knobs. Every fd and mapping it makes is closed and unmapped before
/// it returns; the command runs it in its own short-lived process.
/// </summary>
internal static class HostProbe
{
    private const int Page = 4096;
    private const int Huge = 2 << 20;
    private const int KpfZero = 24;

    private static int LastErrno => Bench.Native.Errno;

    /// <summary>Why the host cannot be probed, or null.</summary>
    public static string? Unavailable() => Bench.KernelProbe.Unavailable();

    public static HostProfile Run()
    {
        var features = ApiFeatures();
        var regs = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var mem in new[] { "anon", "shmem", "hugetlb" })
        {
            foreach (var (name, mode) in HostProfile.RegisterModes)
                regs[mem + "." + name] = RegisterLine(mem, mode, features);
        }
        var thp = Bracketed(KuffdHarness.ReadTrim("/sys/kernel/mm/transparent_hugepage/enabled") ?? "[never]");
        return new HostProfile
        {
            Source = "host " + (KuffdHarness.ReadTrim("/proc/sys/kernel/osrelease") ?? "?"),
            UffdApiFeatures = ScenarioParsing.AltHex(features),
            PagemapScan = PagemapScanWorks(),
            RegisterIoctls = regs,
            SoftDirty = NewVmaIsSoftDirty(),
            MemoryFailure = File.Exists("/proc/sys/vm/memory_failure_recovery"),
            Thp = thp,
            ThpUseZeroPage = KuffdHarness.ReadTrim("/sys/kernel/mm/transparent_hugepage/use_zero_page") == "1",
            ReadFaultZeroPage = ReadFaultMapsZeroPage(),
            Swap = (KuffdHarness.ReadTrim("/proc/swaps") ?? "").Split('\n', StringSplitOptions.RemoveEmptyEntries).Length > 1,
        };
    }

    private static string Bracketed(string s)
    {
        var a = s.IndexOf('[', StringComparison.Ordinal);
        var b = s.IndexOf(']', StringComparison.Ordinal);
        return a >= 0 && b > a ? s[(a + 1)..b] : s;
    }

    private static string ErrnoName(int e) => Mm.ErrnoExtensions.Name((Mm.Errno)e);

    private static int NewUffd()
    {
        var fd = (int)syscall(SysUserfaultfd, OCloexec | ONonblock);
        if (fd < 0)
            throw new InvalidOperationException("userfaultfd: " + ErrnoName(LastErrno));
        return fd;
    }

    /// <summary>UFFDIO_API with no feature requested: the features the kernel offers.</summary>
    private static ulong ApiFeatures()
    {
        var fd = NewUffd();
        try
        {
            var api = new UffdioApi { Api = UffdApi };
            if (IoctlApi(fd, UffdioApiCmd, ref api) != 0)
                throw new InvalidOperationException("UFFDIO_API: " + ErrnoName(LastErrno));
            return api.Features;
        }
        finally
        {
            close(fd);
        }
    }

    /// <summary>A fresh mapping of <paramref name="mem"/> registered in <paramref name="mode"/> on a uffd with every feature: kuffd's register line.</summary>
    private static string RegisterLine(string mem, ulong mode, ulong features)
    {
        var memfd = -1;
        var len = mem == "hugetlb" ? Huge : Page;
        nint addr = -1;
        var uffd = NewUffd();
        try
        {
            var api = new UffdioApi { Api = UffdApi, Features = features };
            if (IoctlApi(uffd, UffdioApiCmd, ref api) != 0)
                return "api " + ErrnoName(LastErrno);
            switch (mem)
            {
                case "shmem":
                    memfd = MemfdCreate("uffdgrpc-probe", MfdCloexec);
                    if (memfd < 0 || ftruncate(memfd, len) != 0)
                        return "memfd " + ErrnoName(LastErrno);
                    addr = mmap(0, (nuint)len, ProtRead | ProtWrite, MapShared, memfd, 0);
                    break;
                case "hugetlb":
                    addr = mmap(0, (nuint)len, ProtRead | ProtWrite, MapPrivate | MapAnonymous | MapHugetlb | MapNoreserve, -1, 0);
                    break;
                default:
                    addr = mmap(0, (nuint)len, ProtRead | ProtWrite, MapPrivate | MapAnonymous, -1, 0);
                    break;
            }
            if (addr == -1)
                return "mmap " + ErrnoName(LastErrno);
            var reg = new UffdioRegister { Start = (ulong)addr, Len = (ulong)len, Mode = mode };
            return IoctlRegister(uffd, UffdioRegisterCmd, ref reg) == 0 ? HostProfile.RegisterLine(Mm.Errno.OK, reg.Ioctls) : ErrnoName(LastErrno);
        }
        finally
        {
            close(uffd);
            if (addr != -1)
                munmap(addr, (nuint)len);
            if (memfd >= 0)
                close(memfd);
        }
    }

    /// <summary>A read of a fresh private anon page (no THP), then KPF_ZERO of the frame its pagemap entry names.</summary>
    private static bool ReadFaultMapsZeroPage()
    {
        var a = mmap(0, Page, ProtRead | ProtWrite, MapPrivate | MapAnonymous, -1, 0);
        if (a == -1)
            throw new InvalidOperationException("mmap: " + ErrnoName(LastErrno));
        try
        {
            madvise(a, Page, MadvNohugepage);
            _ = Marshal.ReadByte(a);
            var entry = ReadU64("/proc/self/pagemap", (long)((ulong)a / Page) * 8);
            if ((entry & (1UL << 63)) == 0)
                throw new InvalidOperationException("the read left no page mapped");
            var pfn = entry & ((1UL << 55) - 1);
            if (pfn == 0)
                throw new InvalidOperationException("pagemap hides PFNs (CAP_SYS_ADMIN needed)");
            return (ReadU64("/proc/kpageflags", (long)pfn * 8) & (1UL << KpfZero)) != 0;
        }
        finally
        {
            munmap(a, Page);
        }
    }

    private static ulong ReadU64(string path, long offset)
    {
        using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read);
        Span<byte> b = stackalloc byte[8];
        if (RandomAccess.Read(h, b, offset) != 8)
            throw new InvalidOperationException($"{path}: short read");
        return BitConverter.ToUInt64(b);
    }

    /// <summary>CONFIG_MEM_SOFT_DIRTY marks every new VMA VM_SOFTDIRTY ("sd" in smaps' VmFlags).</summary>
    private static bool NewVmaIsSoftDirty()
    {
        var a = mmap(0, Page, ProtRead | ProtWrite, MapPrivate | MapAnonymous, -1, 0);
        if (a == -1)
            throw new InvalidOperationException("mmap: " + ErrnoName(LastErrno));
        try
        {
            var head = ((ulong)a).ToString("x", CultureInfo.InvariantCulture) + "-";
            var inVma = false;
            foreach (var line in File.ReadLines("/proc/self/smaps"))
            {
                var sp = line.IndexOf(' ', StringComparison.Ordinal);
                var first = sp > 0 ? line[..sp] : line;
                if (first.Contains('-', StringComparison.Ordinal) && first.Replace("-", "", StringComparison.Ordinal).All(char.IsAsciiHexDigit))
                    inVma = line.StartsWith(head, StringComparison.Ordinal);
                if (inVma && line.StartsWith("VmFlags:", StringComparison.Ordinal))
                    return (" " + line[8..] + " ").Contains(" sd ", StringComparison.Ordinal);
            }
            throw new InvalidOperationException("the probe's mapping is not in /proc/self/smaps");
        }
        finally
        {
            munmap(a, Page);
        }
    }

    /// <summary>PAGEMAP_SCAN (6.7) on one page of a fresh mapping: the ioctl exists when it does not fail with ENOTTY/EINVAL.</summary>
    private static bool PagemapScanWorks()
    {
        var a = mmap(0, Page, ProtRead | ProtWrite, MapPrivate | MapAnonymous, -1, 0);
        if (a == -1)
            throw new InvalidOperationException("mmap: " + ErrnoName(LastErrno));
        var fd = Open("/proc/self/pagemap", ORdonly | OCloexec);
        try
        {
            unsafe
            {
                var regions = stackalloc ulong[3];
                var arg = new Bench.Native.PmScanArg
                {
                    Size = (ulong)sizeof(Bench.Native.PmScanArg),
                    Start = (ulong)a,
                    End = (ulong)a + Page,
                    Vec = (ulong)regions,
                    VecLen = 1,
                    ReturnMask = 1,
                };
                return IoctlScan(fd, PagemapScanCmd, ref arg) >= 0;
            }
        }
        finally
        {
            close(fd);
            munmap(a, Page);
        }
    }
}
