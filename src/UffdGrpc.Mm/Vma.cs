namespace UffdGrpc.Mm;

/// <summary>vm_flags bits used by the model (include/linux/mm.h).</summary>
[Flags]
public enum VmFlags : ulong
{
    None = 0,
    Read = 0x1,
    Write = 0x2,
    Exec = 0x4,
    Shared = 0x8,
    MayRead = 0x10,
    MayWrite = 0x20,
    MayExec = 0x40,
    MayShare = 0x80,
    UffdMissing = 0x200,
    Locked = 0x2000,
    UffdWp = 0x1000,
    DontCopy = 0x20000,
    /// <summary>VM_ACCOUNT: the mapping is charged to the commit limit.</summary>
    Account = 0x10_0000,
    UffdMinor = 0x2_0000_0000,
    SoftDirty = 0x800_0000,
    HugePage = 0x2000_0000,
    NoHugePage = 0x4000_0000,
    WipeOnFork = 0x200_0000,

    /// <summary>__VM_UFFD_FLAGS.</summary>
    UffdFlags = UffdMissing | UffdWp | UffdMinor,
    AccessFlags = Read | Write | Exec,
}

/// <summary>An anon_vma: the lineage of anonymous pages of a VMA and its splits.</summary>
public sealed class AnonVma
{
    private static int s_next;
    public int Id { get; } = Interlocked.Increment(ref s_next);
}

/// <summary>A virtual memory area (vm_area_struct). Half-open [Start, End), page aligned.</summary>
/// <remarks>Protected by the owning <see cref="Kernel"/>'s lock.</remarks>
public sealed class Vma
{
    internal Vma(Mm mm, ulong start, ulong end, VmFlags flags, MemFile? file, ulong pgoff)
    {
        Mm = mm;
        Start = start;
        End = end;
        Flags = flags;
        File = file;
        PgOff = pgoff;
    }

    public Mm Mm { get; }
    public ulong Start { get; internal set; }
    public ulong End { get; internal set; }
    public VmFlags Flags { get; internal set; }
    /// <summary>The mapped file, or null for private anonymous memory.</summary>
    public MemFile? File { get; }
    /// <summary>vm_pgoff: file page of <see cref="Start"/> (for anon: the page index it was created at).</summary>
    public ulong PgOff { get; internal set; }
    /// <summary>vm_userfaultfd_ctx.ctx.</summary>
    public UserfaultfdCtx? UffdCtx { get; internal set; }
    public AnonVma? AnonVma { get; internal set; }
    /// <summary>
    /// list_is_singular(&amp;vma->anon_vma_chain): the VMA's anon_vma chain holds only its own
    /// anon_vma (false for a VMA forked from one that had an anon_vma).
    /// </summary>
    public bool AnonVmaChainSingular { get; internal set; } = true;

    public ulong Pages => (End - Start) / Kernel.PageSize;

    /// <summary>vma_is_anonymous: private anonymous memory (no file behind it).</summary>
    public bool IsAnonymous => File is null;
    /// <summary>vma_is_shmem.</summary>
    public bool IsShmem => File is { IsShmem: true };
    /// <summary>VM_SHARED | VM_MAYSHARE.</summary>
    public bool IsSharedMapping => (Flags & (VmFlags.Shared | VmFlags.MayShare)) != 0;
    public bool IsShared => (Flags & VmFlags.Shared) != 0;
    /// <summary>is_cow_mapping: private and may be written.</summary>
    public bool IsCowMapping => (Flags & (VmFlags.Shared | VmFlags.MayWrite)) == VmFlags.MayWrite;
    /// <summary>userfaultfd_missing.</summary>
    public bool UserfaultfdMissing => (Flags & VmFlags.UffdMissing) != 0;
    /// <summary>userfaultfd_wp.</summary>
    public bool UserfaultfdWp => (Flags & VmFlags.UffdWp) != 0;
    /// <summary>userfaultfd_minor.</summary>
    public bool UserfaultfdMinor => (Flags & VmFlags.UffdMinor) != 0;
    /// <summary>userfaultfd_armed.</summary>
    public bool UserfaultfdArmed => (Flags & VmFlags.UffdFlags) != 0;
    /// <summary>userfaultfd_wp_async.</summary>
    public bool UserfaultfdWpAsync => UserfaultfdWp && UffdCtx is { WpAsync: true };

    /// <summary>
    /// userfaultfd_wp_use_markers: file-backed WP VMAs always use uffd-wp markers for empty
    /// slots; anon WP VMAs only with UFFD_FEATURE_WP_UNPOPULATED (implied by WP_ASYNC).
    /// </summary>
    public bool UserfaultfdWpUseMarkers =>
        UserfaultfdWp && (!IsAnonymous || UffdCtx is { WpUnpopulated: true });

    /// <summary>linear_page_index: the file page at <paramref name="addr"/>.</summary>
    public ulong LinearPageIndex(ulong addr) => ((addr - Start) / Kernel.PageSize) + PgOff;

    public bool Contains(ulong addr) => addr >= Start && addr < End;

    /// <summary>The permission column of /proc/PID/maps.</summary>
    public string PermString =>
        string.Concat(
            (Flags & VmFlags.Read) != 0 ? "r" : "-",
            (Flags & VmFlags.Write) != 0 ? "w" : "-",
            (Flags & VmFlags.Exec) != 0 ? "x" : "-",
            (Flags & VmFlags.MayShare) != 0 ? "s" : "p");

    internal Vma CloneRange(ulong start, ulong end)
    {
        var v = new Vma(Mm, start, end, Flags, File, PgOff + ((start - Start) / Kernel.PageSize))
        {
            UffdCtx = UffdCtx,
            AnonVma = AnonVma,
            AnonVmaChainSingular = AnonVmaChainSingular,
        };
        return v;
    }

    public override string ToString() => $"[{Start:x}-{End:x} {PermString} {Flags}]";
}
