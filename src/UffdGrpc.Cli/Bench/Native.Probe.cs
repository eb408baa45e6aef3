using System.Runtime.InteropServices;

namespace UffdGrpc.Cli.Bench;

/// <summary>The calls <c>probe</c> adds (x86-64 values from asm/mman.h and linux/memfd.h).</summary>
internal static partial class Native
{
    public const int MapShared = 0x01, MapHugetlb = 0x40000;
    public const uint MfdCloexec = 1;

    [LibraryImport("libc", EntryPoint = "memfd_create", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    public static partial int MemfdCreate(string name, uint flags);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int ftruncate(int fd, long length);
}
