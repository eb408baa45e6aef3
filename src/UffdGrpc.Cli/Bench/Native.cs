using System.Runtime.InteropServices;

namespace UffdGrpc.Cli.Bench;

/// <summary>
/// The few Linux calls the live kernel measurements need (x86-64 numbers and layouts, from
/// include/uapi/linux/userfaultfd.h, include/uapi/linux/fs.h and asm/unistd_64.h). Used only
/// by <see cref="KernelProbe"/>; the model never touches the host kernel.
/// </summary>
internal static partial class Native
{
    public const int ProtRead = 1, ProtWrite = 2;
    public const int MapPrivate = 0x02, MapAnonymous = 0x20, MapNoreserve = 0x4000;
    public const int MadvHugepage = 14, MadvNohugepage = 15, MadvPopulateWrite = 23;
    public const int OCloexec = 0x80000, ONonblock = 0x800, ORdonly = 0;
    public const long SysUserfaultfd = 323;

    public const ulong UffdApi = 0xAA;
    public const ulong FeatureWpUnpopulated = 1UL << 13, FeatureWpAsync = 1UL << 15;
    public const ulong RegisterModeWp = 2;
    public const ulong WriteprotectModeWp = 1;

    // _IOWR(0xAA, nr, size) and _IOWR('f', 16, struct pm_scan_arg).
    public const ulong UffdioApiCmd = 0xC018AA3F;
    public const ulong UffdioRegisterCmd = 0xC020AA00;
    public const ulong UffdioWriteprotectCmd = 0xC018AA06;
    public const ulong PagemapScanCmd = 0xC0606610;

    public const ulong PageIsWritten = 1UL << 1;
    public const ulong PmScanWpMatching = 1, PmScanCheckWpasync = 2;

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioApi
    {
        public ulong Api, Features, Ioctls;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioRegister
    {
        public ulong Start, Len, Mode, Ioctls;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioWriteprotect
    {
        public ulong Start, Len, Mode;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct PmScanArg
    {
        public ulong Size, Flags, Start, End, WalkEnd, Vec, VecLen, MaxPages;
        public ulong CategoryInverted, CategoryMask, CategoryAnyofMask, ReturnMask;
    }

    /// <summary>struct uffd_msg (32 bytes); a page fault's address is at offset 16.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct UffdMsg
    {
        public ulong Head, Flags, Address, Feat;
    }

    [LibraryImport("libc", SetLastError = true)]
    public static partial nint mmap(nint addr, nuint length, int prot, int flags, int fd, nint offset);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int munmap(nint addr, nuint length);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int mprotect(nint addr, nuint length, int prot);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int madvise(nint addr, nuint length, int advice);

    [LibraryImport("libc", SetLastError = true)]
    public static partial long syscall(long number, long arg);

    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)]
    public static partial int IoctlApi(int fd, ulong request, ref UffdioApi arg);

    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)]
    public static partial int IoctlRegister(int fd, ulong request, ref UffdioRegister arg);

    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)]
    public static partial int IoctlWriteprotect(int fd, ulong request, ref UffdioWriteprotect arg);

    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)]
    public static partial long IoctlScan(int fd, ulong request, ref PmScanArg arg);

    [LibraryImport("libc", SetLastError = true)]
    public static partial nint read(int fd, ref UffdMsg buf, nuint count);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int close(int fd);

    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    public static partial int Open(string path, int flags);

    /// <summary>A store done by native code: a thread blocked in a userfault is then in preemptive mode, so a GC never waits for it.</summary>
    [LibraryImport("libc")]
    public static partial nint memset(nint s, int c, nuint n);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int sched_setaffinity(int pid, nuint size, ref ulong mask);

    public static int Errno => Marshal.GetLastPInvokeError();
}
