namespace UffdGrpc.Mm;

/// <summary>
/// What each kernel profile has (spec §7). Every behaviour that differs between profiles is a
/// named property here, with the kernel change that introduced it; the code paths consult
/// these and never compare profiles themselves. The 6.1 profile is Debian 12's
/// linux-image 6.1.0-56-amd64 (6.1.192): mainline 6.1 plus the stable backports that the
/// recorded traces show (tests/conformance/README.md, "Linux 6.1 profile").
/// </summary>
public sealed partial class Kernel
{
    /// <summary>The seed profile, Linux 5.7: uffd-wp for private anonymous memory only, no MINOR, no markers.</summary>
    public bool IsV5_7 => Profile == KernelProfile.V5_7;

    /// <summary>The reference profile, Linux 6.18.</summary>
    public bool IsV6_18 => Profile == KernelProfile.V6_18;

    /// <summary>
    /// The 6.x uffd machinery that 6.1 already has: MINOR mode and UFFDIO_CONTINUE (5.13),
    /// MINOR_SHMEM (5.14), uffd-wp on shmem with PTE markers (5.19), the anon-exclusive page
    /// flag (5.19), fork keeping uffd-wp only in a child VMA that stays registered (5.14),
    /// UNREGISTER and close resetting uffd-wp, pagemap bit 57 (5.14), MADV_COLLAPSE (6.1),
    /// mprotect's MM_CP_TRY_CHANGE_WRITABLE (6.0).
    /// </summary>
    public bool IsV6 => Profile != KernelProfile.V5_7;

    /// <summary>PAGEMAP_SCAN and UFFD_FEATURE_WP_ASYNC (6.7).</summary>
    public bool HasPagemapScan => IsV6_18;

    /// <summary>UFFDIO_POISON and UFFD_FEATURE_POISON (6.6). On older kernels the ioctl number is unknown: EINVAL.</summary>
    public bool HasPoison => IsV6_18;

    /// <summary>UFFDIO_MOVE and UFFD_FEATURE_MOVE (6.8). On older kernels the ioctl number is unknown: EINVAL.</summary>
    public bool HasMove => IsV6_18;

    /// <summary>UFFDIO_CONTINUE_MODE_WP (6.4); 6.1's userfaultfd_continue accepts DONTWAKE only (EINVAL, field untouched).</summary>
    public bool HasContinueModeWp => IsV6_18;

    /// <summary>
    /// UFFDIO_WRITEPROTECT over several VMAs, holes skipped (after 6.1; spec §7 "≈6.3–6.4");
    /// 6.1's mwriteprotect_range takes find_dst_vma(start, len): one VMA that holds the whole
    /// range, else ENOENT.
    /// </summary>
    public bool WriteprotectSpansVmas => IsV6_18;

    /// <summary>
    /// uffd_wp_range resolving with MM_CP_TRY_CHANGE_WRITABLE (6.3, spec §4.3); 6.1's
    /// uffd_wp_range passes vm_get_page_prot(vm_flags) and MM_CP_UFFD_WP_RESOLVE only.
    /// </summary>
    public bool ResolveTriesChangeWritable => IsV6_18;

    /// <summary>
    /// mremap without EVENT_REMAP clears uffd-wp from the moved range (6.13, spec §7; Debian's
    /// 6.1.192 carries the stable backport: move_ptes checks vma_has_uffd_without_event_remap).
    /// </summary>
    public bool MremapClearsUffdWp => IsV6;

    /// <summary>
    /// mprotect_fixup drops VM_ACCOUNT when an anonymous VMA without anon_vma becomes
    /// read-only (6.18 has it); 6.1's mprotect_fixup "cannot reduce our commit if we make it
    /// unwritable again" and keeps VM_ACCOUNT.
    /// </summary>
    public bool MprotectDropsAccount => IsV6_18;

    /// <summary>
    /// do_swap_page maps an exclusive swapped-in page writable on a read fault too (6.18);
    /// 6.1's do_swap_page does so only for a write fault (maybe_mkwrite under FAULT_FLAG_WRITE).
    /// </summary>
    public bool SwapinMapsWritableOnRead => IsV6_18;

    /// <summary>
    /// change_huge_pmd honours MM_CP_TRY_CHANGE_WRITABLE (can_change_pmd_writable, 6.18); 6.1's
    /// change_huge_pmd leaves the write bit to the fault handler.
    /// </summary>
    public bool PmdTryChangeWritable => IsV6_18;

    /// <summary>
    /// can_change_pte_writable accepts a clean exclusive anon PTE (6.18); 6.1's requires
    /// pte_dirty for every mapping.
    /// </summary>
    public bool CleanAnonPteMayBecomeWritable => IsV6_18;

    /// <summary>
    /// A write fault on the huge zero PMD allocates a THP (do_huge_zero_wp_pmd, 6.18); 6.1's
    /// do_huge_pmd_wp_page splits the PMD and falls back to PTEs ("goto fallback").
    /// </summary>
    public bool HugeZeroWpAllocatesThp => IsV6_18;

    /// <summary>
    /// do_wp_page reuses a large anon folio mapped only by this mm
    /// (__wp_can_reuse_large_anon_folio, 6.18); 6.1's do_wp_page copies whenever the folio
    /// has more references than this mapping and the swap cache.
    /// </summary>
    public bool ReusesLargeAnonFolio => IsV6_18;

    /// <summary>
    /// UFFDIO_UNREGISTER refuses a VMA registered on another context (EINVAL, 6.18); 6.1's
    /// userfaultfd_unregister only checks vma_can_userfault, so one uffd can unregister (and
    /// wake, through the VMA's own context) another's range. The v5.7 profile keeps the check.
    /// </summary>
    public bool UnregisterChecksOwner => Profile != KernelProfile.V6_1;

    /// <summary>
    /// madvise_collapse_errno maps SCAN_EXCEED_NONE_PTE (an empty slot in a uffd-armed VMA) to
    /// EBUSY (6.18); 6.1's maps it, like every result but allocation, cgroup and transient
    /// ones, to EINVAL.
    /// </summary>
    public bool CollapseNonePteIsEbusy => IsV6_18;

    /// <summary>
    /// MADV_COLLAPSE of anon memory fails with SCAN_PAGE_RO (EINVAL) when no PTE of the range is
    /// writable: 6.1's hpage_collapse_scan_pmd checks "writable" for every caller; 6.18 only
    /// for khugepaged.
    /// </summary>
    public bool CollapseNeedsWritablePte => Profile == KernelProfile.V6_1;

    /// <summary>
    /// collapse_file refuses to fill holes of a range that some VMA has MISSING-registered
    /// (SCAN_EXCEED_NONE_PTE, 6.18); 6.1's collapse_file has no userfaultfd check and
    /// zero-fills them.
    /// </summary>
    public bool CollapseFileChecksMissingHoles => IsV6_18;

    /// <summary>
    /// Splitting an anon THP maps its zero-filled subpages to the shared zero page
    /// (RMP_USE_SHARED_ZEROPAGE in remap_page, 6.12); 6.1's split_huge_page keeps every
    /// subpage mapped as it is.
    /// </summary>
    public bool SplitMapsZeroFilledToZeroPage => IsV6_18;

    /// <summary>
    /// MADV_FREE leaves a PTE-mapped large folio that lies wholly in the range whole and
    /// skips a shared one (6.18); 6.1's madvise_free_pte_range splits every exclusive large
    /// folio it meets and stops the PMD's walk at a shared one ("folio_estimated_sharers != 1").
    /// </summary>
    public bool FreeKeepsWholeLargeFolio => IsV6_18;

    /// <summary>
    /// CONFIG_PT_RECLAIM (6.14): MADV_DONTNEED of a whole PMD range frees its emptied PTE
    /// table. 6.1 keeps the table, so a later read fault there cannot map a huge PMD.
    /// </summary>
    public bool HasPtReclaim => IsV6_18;

    /// <summary>
    /// smaps counts a PROT_NONE huge PMD (6.18); 6.1's smaps_pmd_entry looks the page up with
    /// follow_trans_huge_pmd(FOLL_DUMP), which returns NULL for pmd_protnone without
    /// FOLL_FORCE (gup_can_follow_protnone), so such a PMD adds nothing.
    /// </summary>
    public bool SmapsCountsProtnonePmd => IsV6_18;

    /// <summary>
    /// The 6.1 readahead path with order-0 folios (mm/readahead.c): read-around marks the
    /// folio at nr_to_read - async_size with PG_readahead, fault-around skips marked folios,
    /// and a fault on a marked folio starts the next (async) window. The 6.18 profile reads
    /// around without a marker, which its goldens bear out.
    /// </summary>
    public bool ReadaheadMarksFolios => Profile == KernelProfile.V6_1;

    /// <summary>
    /// A fill locks its VMA with uffd_mfill_lock, which prepares a private VMA's anon_vma
    /// before the registration checks (6.18); 6.1's __mcopy_atomic checks mmap_changing, then
    /// find_dst_vma (one registered VMA holding the range, else ENOENT) and the mode and VMA
    /// kind, and only then calls anon_vma_prepare.
    /// </summary>
    public bool FillPreparesAnonVmaFirst => IsV6_18;

    /// <summary>
    /// userfaultfd_register and userfaultfd_unregister pass the VMA's own vm_pgoff to
    /// vma_merge also when the range starts inside the VMA (6.1); the pgoff then does not
    /// match the piece, so a piece that starts inside its VMA merges with no neighbour. 6.18
    /// computes the piece's pgoff.
    /// </summary>
    public bool UffdMergeUsesVmaPgoff => Profile == KernelProfile.V6_1;

    /// <summary>
    /// userfaultfd_copy checks the source with validate_unaligned_range (6.18); 5.7's and
    /// 6.1's only refuse a source range that wraps ("double check for wraparound").
    /// </summary>
    public bool CopyValidatesSourceRange => IsV6_18;

    /// <summary>
    /// A fill ioctl that sees mmap_changing at its entry stores -EAGAIN in the result field
    /// (put_user before "goto out", 6.18); 5.7's and 6.1's userfaultfd_copy, _zeropage and
    /// _continue return -EAGAIN before reading the struct, so the field stays untouched.
    /// </summary>
    public bool FillEagainWritesField => IsV6_18;

    /// <summary>UFFD_USER_MODE_ONLY (5.11).</summary>
    public bool HasUserModeOnly => IsV6;

    /// <summary>UFFDIO_API features of the profile (UFFD_API_FEATURES).</summary>
    public static UffdFeatures ApiFeatures(KernelProfile profile) => profile switch
    {
        KernelProfile.V6_18 => (UffdFeatures)0x1ffff,
        KernelProfile.V6_1 => (UffdFeatures)0x1fff,
        _ => (UffdFeatures)0x1ff,
    };

    /// <summary>UFFD_API_RANGE_IOCTLS of the profile (non-hugetlb), before REGISTER masks WRITEPROTECT and CONTINUE.</summary>
    internal ulong RangeIoctls => Profile switch
    {
        KernelProfile.V6_18 => Uapi.RangeIoctls,
        KernelProfile.V6_1 => Uapi.RangeIoctlsV61,
        _ => Uapi.RangeIoctlsV57,
    };

    /// <summary>
    /// The machine settings a profile starts with: the reference machine's for 6.18 and 5.7;
    /// for 6.1 Debian's build, which has CONFIG_MEM_SOFT_DIRTY=y and CONFIG_MEMORY_FAILURE=y.
    /// </summary>
    public static MachineConfig DefaultConfig(KernelProfile profile) =>
        profile == KernelProfile.V6_1 ? new MachineConfig { SoftDirty = true, MemoryFailure = true } : new MachineConfig();

    /// <summary>
    /// Whether CONFIG_MEM_SOFT_DIRTY and CONFIG_MEMORY_FAILURE are fixed by the profile: the
    /// 6.1 profile is one distribution build (Debian 12), so they are built in and cannot be
    /// turned off; the 6.18 and 5.7 profiles leave them to the machine settings.
    /// </summary>
    public static bool ConfigIsBuiltIn(KernelProfile profile) => profile == KernelProfile.V6_1;
}
