namespace UffdGrpc.Mm;

/// <summary>Values of include/uapi/linux/userfaultfd.h and fs.h that the model speaks.</summary>
public static class Uapi
{
    public const ulong UffdApi = 0xAA;

    /// <summary>userfaultfd(2) flag: only user-mode faults are handled.</summary>
    public const int UffdUserModeOnly = 1;
    public const int ONonblock = 0x800;
    public const int OCloexec = 0x80000;

    public const ulong RegisterModeMissing = 1;
    public const ulong RegisterModeWp = 2;
    public const ulong RegisterModeMinor = 4;

    public const ulong CopyModeDontwake = 1;
    public const ulong CopyModeWp = 2;
    public const ulong ZeropageModeDontwake = 1;
    public const ulong WriteprotectModeWp = 1;
    public const ulong WriteprotectModeDontwake = 2;
    public const ulong ContinueModeDontwake = 1;
    public const ulong ContinueModeWp = 2;
    public const ulong PoisonModeDontwake = 1;
    public const ulong MoveModeDontwake = 1;
    public const ulong MoveModeAllowSrcHoles = 2;

    // ioctl numbers (the bit index in the returned ioctls masks).
    public const int UffdioRegister = 0x00;
    public const int UffdioUnregister = 0x01;
    public const int UffdioWake = 0x02;
    public const int UffdioCopy = 0x03;
    public const int UffdioZeropage = 0x04;
    public const int UffdioMove = 0x05;
    public const int UffdioWriteprotect = 0x06;
    public const int UffdioContinue = 0x07;
    public const int UffdioPoison = 0x08;
    public const int UffdioApi = 0x3F;

    /// <summary>UFFD_API_IOCTLS: REGISTER, UNREGISTER and API.</summary>
    public const ulong ApiIoctls = (1UL << UffdioRegister) | (1UL << UffdioUnregister) | (1UL << 63);

    /// <summary>UFFD_API_RANGE_IOCTLS (6.x, non-hugetlb).</summary>
    public const ulong RangeIoctls = (1UL << UffdioWake) | (1UL << UffdioCopy) | (1UL << UffdioZeropage)
        | (1UL << UffdioMove) | (1UL << UffdioWriteprotect) | (1UL << UffdioContinue) | (1UL << UffdioPoison);

    /// <summary>The 6.1 range ioctls: WAKE, COPY, ZEROPAGE, WRITEPROTECT, CONTINUE (no MOVE, no POISON).</summary>
    public const ulong RangeIoctlsV61 = (1UL << UffdioWake) | (1UL << UffdioCopy) | (1UL << UffdioZeropage)
        | (1UL << UffdioWriteprotect) | (1UL << UffdioContinue);

    /// <summary>The v5.7 range ioctls: WAKE, COPY, ZEROPAGE, WRITEPROTECT.</summary>
    public const ulong RangeIoctlsV57 = (1UL << UffdioWake) | (1UL << UffdioCopy) | (1UL << UffdioZeropage)
        | (1UL << UffdioWriteprotect);

    public const int PmScanWpMatching = 1;
    public const int PmScanCheckWpasync = 2;

    // PAGEMAP_SCAN categories.
    public const ulong PageIsWpallowed = 1 << 0;
    public const ulong PageIsWritten = 1 << 1;
    public const ulong PageIsFile = 1 << 2;
    public const ulong PageIsPresent = 1 << 3;
    public const ulong PageIsSwapped = 1 << 4;
    public const ulong PageIsPfnzero = 1 << 5;
    public const ulong PageIsHuge = 1 << 6;
    public const ulong PageIsSoftDirty = 1 << 7;
    public const ulong PageIsGuard = 1 << 8;
    public const ulong PmScanCategories = 0x1ff;

    // /proc/PID/pagemap bits.
    public const ulong PmSoftDirty = 1UL << 55;
    public const ulong PmMmapExclusive = 1UL << 56;
    public const ulong PmUffdWp = 1UL << 57;
    public const ulong PmGuard = 1UL << 58;
    public const ulong PmFile = 1UL << 61;
    public const ulong PmSwap = 1UL << 62;
    public const ulong PmPresent = 1UL << 63;
    public const ulong PmPfnMask = (1UL << 55) - 1;

    // /proc/kpageflags bits.
    public const int KpfHwpoison = 19;
    public const int KpfThp = 22;
    public const int KpfZeroPage = 24;
}

/// <summary>UFFD_FEATURE_* bits of uffdio_api.features.</summary>
[Flags]
public enum UffdFeatures : ulong
{
    None = 0,
    PagefaultFlagWp = 1 << 0,
    EventFork = 1 << 1,
    EventRemap = 1 << 2,
    EventRemove = 1 << 3,
    MissingHugetlbfs = 1 << 4,
    MissingShmem = 1 << 5,
    EventUnmap = 1 << 6,
    Sigbus = 1 << 7,
    ThreadId = 1 << 8,
    MinorHugetlbfs = 1 << 9,
    MinorShmem = 1 << 10,
    ExactAddress = 1 << 11,
    WpHugetlbfsShmem = 1 << 12,
    WpUnpopulated = 1 << 13,
    Poison = 1 << 14,
    WpAsync = 1 << 15,
    Move = 1 << 16,
}

/// <summary>uffd_msg.event (UFFD_EVENT_*), kernel numbers.</summary>
public enum UffdEvent : byte
{
    Pagefault = 0x12,
    Fork = 0x13,
    Remap = 0x14,
    Remove = 0x15,
    Unmap = 0x16,
}

/// <summary>UFFD_PAGEFAULT_FLAG_* of a page-fault message.</summary>
[Flags]
public enum PagefaultFlags : ulong
{
    None = 0,
    Write = 1,
    Wp = 2,
    Minor = 4,
}

/// <summary>madvise(2) advice values (x86-64).</summary>
public enum Madv
{
    Normal = 0,
    Random = 1,
    Sequential = 2,
    Willneed = 3,
    Dontneed = 4,
    Free = 8,
    Remove = 9,
    Dontfork = 10,
    Dofork = 11,
    Mergeable = 12,
    Unmergeable = 13,
    Hugepage = 14,
    Nohugepage = 15,
    Dontdump = 16,
    Dodump = 17,
    Wipeonfork = 18,
    Keeponfork = 19,
    Cold = 20,
    Pageout = 21,
    PopulateRead = 22,
    PopulateWrite = 23,
    Collapse = 25,
}

/// <summary>mmap(2) protection bits.</summary>
[Flags]
public enum Prot
{
    None = 0,
    Read = 1,
    Write = 2,
    Exec = 4,
}

/// <summary>Signal outcome of a user access (si_signo/si_code).</summary>
public enum SigCode
{
    None = 0,
    SegvMaperr,
    SegvAccerr,
    BusAdrerr,
    BusMceerrAr,
}
