using System.Runtime.CompilerServices;

namespace UffdGrpc.Mm;

/// <summary>
/// x86-64 page-table entry bit positions (arch/x86/include/asm/pgtable_types.h).
/// Non-present entries (swap entries and PTE markers) use the model's own layout for the
/// offset and type fields but the kernel's positions for the swap soft-dirty (bit 1),
/// swap uffd-wp (bit 2, _PAGE_USER) and swap-exclusive (bit 3) flags.
/// </summary>
public static class PteBits
{
    public const int Present = 0;
    public const int Rw = 1;
    public const int User = 2;
    public const int Accessed = 5;
    public const int Dirty = 6;
    public const int Pse = 7;
    public const int ProtNone = 8;
    public const int Special = 9;
    public const int UffdWp = 10;
    public const int SoftDirty = 11;
    public const int Nx = 63;

    public const ulong PagePresent = 1UL << Present;
    public const ulong PageRw = 1UL << Rw;
    public const ulong PageUser = 1UL << User;
    public const ulong PageAccessed = 1UL << Accessed;
    public const ulong PageDirty = 1UL << Dirty;
    public const ulong PagePse = 1UL << Pse;
    public const ulong PageProtNone = 1UL << ProtNone;
    public const ulong PageSpecial = 1UL << Special;
    public const ulong PageUffdWp = 1UL << UffdWp;
    public const ulong PageSoftDirty = 1UL << SoftDirty;
    public const ulong PageNx = 1UL << Nx;

    /// <summary>Physical frame number field, bits 12-51.</summary>
    public const ulong PfnMask = ((1UL << 52) - 1) & ~0xfffUL;

    /// <summary>
    /// _PAGE_CHG_MASK: the bits pte_modify keeps. uffd-wp is one of them, which is why a
    /// protection change (mprotect) never drops the uffd-wp bit.
    /// </summary>
    public const ulong ChgMask = PfnMask | PagePse | PageSpecial | PageAccessed | PageDirty | PageSoftDirty | PageUffdWp;

    // Non-present entries.
    public const ulong SwpSoftDirty = 1UL << 1;
    public const ulong SwpUffdWp = 1UL << 2;
    public const ulong SwpExclusive = 1UL << 3;
    public const int SwpTypeShift = 58;
    public const int SwpOffsetShift = 9;
    public const ulong SwpOffsetMask = (1UL << 49) - 1;
    /// <summary>Swap type used for PTE markers (SWP_PTE_MARKER).</summary>
    public const ulong SwpTypeMarker = 31;
    /// <summary>Swap type of hwpoison entries (SWP_HWPOISON = MAX_SWAPFILES = 32 - 3 device - 3 migration - 1 hwpoison - 1 marker).</summary>
    public const ulong SwpTypeHwpoison = 24;
}

/// <summary>PTE marker bits (include/linux/swapops.h).</summary>
[Flags]
public enum PteMarker : ulong
{
    None = 0,
    UffdWp = 1 << 0,
    Poisoned = 1 << 1,
    Guard = 1 << 2,
}

/// <summary>
/// A page-table entry value (pte_t). Pure helpers return a new value and carry the kernel's
/// invariants: <see cref="MkDirty"/> also sets soft-dirty, <see cref="MkUffdWp"/> also
/// write-protects (x86 since "mm/uffd: Always wr-protect pte in pte_mkuffd_wp()").
/// </summary>
public readonly record struct Pte(ulong Value)
{
    public static readonly Pte None;

    /// <summary>Models pfn_pte(): a present, user, accessed entry for <paramref name="pfn"/>.</summary>
    public static Pte FromPfn(ulong pfn) =>
        new((pfn << 12) | PteBits.PagePresent | PteBits.PageUser | PteBits.PageAccessed);

    /// <summary>Models swp_entry_to_pte(swp_entry(type 0, offset)).</summary>
    public static Pte SwapEntry(ulong slot) => new((slot & PteBits.SwpOffsetMask) << PteBits.SwpOffsetShift);

    /// <summary>Models swp_entry_to_pte(make_hwpoison_entry(page)): type SWP_HWPOISON, offset the pfn.</summary>
    public static Pte HwpoisonEntry(ulong pfn) =>
        new((PteBits.SwpTypeHwpoison << PteBits.SwpTypeShift) | ((pfn & PteBits.SwpOffsetMask) << PteBits.SwpOffsetShift));

    /// <summary>Models make_pte_marker().</summary>
    public static Pte Marker(PteMarker marker) =>
        new((PteBits.SwpTypeMarker << PteBits.SwpTypeShift) | (((ulong)marker & PteBits.SwpOffsetMask) << PteBits.SwpOffsetShift));

    public bool IsNone => Value == 0;
    /// <summary>pte_present: _PAGE_PRESENT or _PAGE_PROTNONE (a PROT_NONE entry is present).</summary>
    public bool Present => (Value & (PteBits.PagePresent | PteBits.PageProtNone)) != 0;
    /// <summary>The MMU may use the entry (_PAGE_PRESENT set; not a PROT_NONE entry).</summary>
    public bool HwPresent => (Value & PteBits.PagePresent) != 0;
    /// <summary>A swap-like (non-present, non-none) entry: swap entry or PTE marker.</summary>
    public bool IsSwapLike => Value != 0 && !Present;
    public bool IsMarker => IsSwapLike && (Value >> PteBits.SwpTypeShift) == PteBits.SwpTypeMarker;
    /// <summary>is_hwpoison_entry: memory_failure replaced the mapping of a poisoned page (the offset is its pfn).</summary>
    public bool IsHwpoison => IsSwapLike && (Value >> PteBits.SwpTypeShift) == PteBits.SwpTypeHwpoison;
    /// <summary>A real swap entry (not a marker, not a hwpoison entry).</summary>
    public bool IsSwap => IsSwapLike && !IsMarker && !IsHwpoison;
    public PteMarker MarkerBits => IsMarker ? (PteMarker)((Value >> PteBits.SwpOffsetShift) & PteBits.SwpOffsetMask) : PteMarker.None;
    /// <summary>pte_marker_uffd_wp: a marker carrying PTE_MARKER_UFFD_WP.</summary>
    public bool IsUffdWpMarker => (MarkerBits & PteMarker.UffdWp) != 0;
    public bool IsPoisonMarker => (MarkerBits & PteMarker.Poisoned) != 0;
    public bool IsGuardMarker => (MarkerBits & PteMarker.Guard) != 0;
    public ulong SwapSlot => (Value >> PteBits.SwpOffsetShift) & PteBits.SwpOffsetMask;

    public ulong Pfn => (Value & PteBits.PfnMask) >> 12;
    /// <summary>pte_write.</summary>
    public bool Write => Present && (Value & PteBits.PageRw) != 0;
    /// <summary>pte_dirty.</summary>
    public bool Dirty => Present && (Value & PteBits.PageDirty) != 0;
    /// <summary>pte_young.</summary>
    public bool Young => Present && (Value & PteBits.PageAccessed) != 0;
    /// <summary>pte_special (the zero page).</summary>
    public bool Special => Present && (Value & PteBits.PageSpecial) != 0;
    /// <summary>pte_soft_dirty.</summary>
    public bool SoftDirty => Present && (Value & PteBits.PageSoftDirty) != 0;
    /// <summary>pte_uffd_wp.</summary>
    public bool UffdWp => Present && (Value & PteBits.PageUffdWp) != 0;
    /// <summary>pte_swp_soft_dirty.</summary>
    public bool SwpSoftDirty => IsSwapLike && (Value & PteBits.SwpSoftDirty) != 0;
    /// <summary>pte_swp_uffd_wp: the swap-entry uffd-wp bit (a marker may carry it too, erratum 10).</summary>
    public bool SwpUffdWp => IsSwapLike && (Value & PteBits.SwpUffdWp) != 0;
    /// <summary>pte_swp_exclusive.</summary>
    public bool SwpExclusive => IsSwap && (Value & PteBits.SwpExclusive) != 0;
    /// <summary>pte_swp_uffd_wp_any: a swap entry with uffd-wp or a uffd-wp marker.</summary>
    public bool SwpUffdWpAny => SwpUffdWp || IsUffdWpMarker;
    /// <summary>Any uffd-wp protection carried by this entry (present, swap or marker).</summary>
    public bool AnyUffdWp => UffdWp || SwpUffdWpAny;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private Pte Set(ulong bits) => new(Value | bits);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private Pte Clear(ulong bits) => new(Value & ~bits);

    /// <summary>pte_mkwrite.</summary>
    public Pte MkWrite() => Set(PteBits.PageRw);
    /// <summary>pte_wrprotect.</summary>
    public Pte Wrprotect() => Clear(PteBits.PageRw);
    /// <summary>pte_mkdirty: on x86 sets both _PAGE_DIRTY and _PAGE_SOFT_DIRTY.</summary>
    public Pte MkDirty() => Set(PteBits.PageDirty | PteBits.PageSoftDirty);
    /// <summary>pte_mkclean.</summary>
    public Pte MkClean() => Clear(PteBits.PageDirty);
    /// <summary>pte_mkyoung.</summary>
    public Pte MkYoung() => Set(PteBits.PageAccessed);
    /// <summary>pte_mkold.</summary>
    public Pte MkOld() => Clear(PteBits.PageAccessed);
    /// <summary>pte_mkspecial.</summary>
    public Pte MkSpecial() => Set(PteBits.PageSpecial);
    /// <summary>pte_mksoft_dirty.</summary>
    public Pte MkSoftDirty() => Set(PteBits.PageSoftDirty);
    /// <summary>pte_clear_soft_dirty.</summary>
    public Pte ClearSoftDirty() => Clear(PteBits.PageSoftDirty);
    /// <summary>pte_mkuffd_wp: sets _PAGE_UFFD_WP and write-protects.</summary>
    public Pte MkUffdWp() => Set(PteBits.PageUffdWp).Wrprotect();
    /// <summary>pte_clear_uffd_wp: clears _PAGE_UFFD_WP; the write bit is left alone.</summary>
    public Pte ClearUffdWp() => Clear(PteBits.PageUffdWp);

    /// <summary>
    /// pte_modify: replaces the protection bits with <paramref name="newProt"/> and keeps
    /// everything in _PAGE_CHG_MASK (pfn, accessed, dirty, soft-dirty, special, uffd-wp).
    /// </summary>
    public Pte Modify(ulong newProt) => new((Value & PteBits.ChgMask) | (newProt & ~PteBits.ChgMask));

    /// <summary>pte_swp_mkuffd_wp.</summary>
    public Pte SwpMkUffdWp() => Set(PteBits.SwpUffdWp);
    /// <summary>pte_swp_clear_uffd_wp.</summary>
    public Pte SwpClearUffdWp() => Clear(PteBits.SwpUffdWp);
    /// <summary>pte_swp_mksoft_dirty.</summary>
    public Pte SwpMkSoftDirty() => Set(PteBits.SwpSoftDirty);
    /// <summary>pte_swp_clear_soft_dirty.</summary>
    public Pte SwpClearSoftDirty() => Clear(PteBits.SwpSoftDirty);
    /// <summary>pte_swp_mkexclusive.</summary>
    public Pte SwpMkExclusive() => Set(PteBits.SwpExclusive);
    /// <summary>pte_swp_clear_exclusive.</summary>
    public Pte SwpClearExclusive() => Clear(PteBits.SwpExclusive);

    public override string ToString() => $"0x{Value:x16}";
}

/// <summary>
/// A PMD value (pmd_t) for a huge (PSE) mapping; same bit positions as <see cref="Pte"/>.
/// A PMD that points to a PTE table is represented by the table object itself
/// (<see cref="PmdTable.Tables"/>), not by a value.
/// </summary>
public readonly record struct Pmd(ulong Value)
{
    /// <summary>Models mk_huge_pmd()/pfn_pmd() of a present huge mapping.</summary>
    public static Pmd Huge(ulong pfn) =>
        new((pfn << 12) | PteBits.PagePresent | PteBits.PageUser | PteBits.PageAccessed | PteBits.PagePse);

    public bool IsNone => Value == 0;
    /// <summary>pmd_trans_huge.</summary>
    public bool TransHuge => (Value & PteBits.PagePse) != 0 && (Value & (PteBits.PagePresent | PteBits.PageProtNone)) != 0;
    /// <summary>The MMU may use the entry (not PROT_NONE).</summary>
    public bool HwPresent => (Value & PteBits.PagePresent) != 0;
    public ulong Pfn => (Value & PteBits.PfnMask) >> 12;
    /// <summary>pmd_write.</summary>
    public bool Write => (Value & PteBits.PageRw) != 0;
    /// <summary>pmd_dirty.</summary>
    public bool Dirty => (Value & PteBits.PageDirty) != 0;
    /// <summary>pmd_young.</summary>
    public bool Young => (Value & PteBits.PageAccessed) != 0;
    /// <summary>pmd_soft_dirty.</summary>
    public bool SoftDirty => (Value & PteBits.PageSoftDirty) != 0;
    /// <summary>pmd_uffd_wp.</summary>
    public bool UffdWp => (Value & PteBits.PageUffdWp) != 0;

    /// <summary>pmd_mkwrite.</summary>
    public Pmd MkWrite() => new(Value | PteBits.PageRw);
    /// <summary>pmd_wrprotect.</summary>
    public Pmd Wrprotect() => new(Value & ~PteBits.PageRw);
    /// <summary>pmd_mkdirty (sets soft-dirty too, as on x86).</summary>
    public Pmd MkDirty() => new(Value | PteBits.PageDirty | PteBits.PageSoftDirty);
    /// <summary>pmd_mkclean.</summary>
    public Pmd MkClean() => new(Value & ~PteBits.PageDirty);
    /// <summary>pmd_mkyoung.</summary>
    public Pmd MkYoung() => new(Value | PteBits.PageAccessed);
    /// <summary>pmd_mkold.</summary>
    public Pmd MkOld() => new(Value & ~PteBits.PageAccessed);
    /// <summary>pmd_mkuffd_wp: sets uffd-wp and write-protects.</summary>
    public Pmd MkUffdWp() => new((Value | PteBits.PageUffdWp) & ~PteBits.PageRw);
    /// <summary>pmd_clear_uffd_wp.</summary>
    public Pmd ClearUffdWp() => new(Value & ~PteBits.PageUffdWp);
    /// <summary>pmd_clear_soft_dirty.</summary>
    public Pmd ClearSoftDirty() => new(Value & ~PteBits.PageSoftDirty);
    /// <summary>pmd_modify: keeps _HPAGE_CHG_MASK (pfn, PSE, A, D, SD, uffd-wp).</summary>
    public Pmd Modify(ulong newProt) => new((Value & PteBits.ChgMask) | (newProt & ~PteBits.ChgMask) | PteBits.PagePse);

    public override string ToString() => $"0x{Value:x16}";
}
