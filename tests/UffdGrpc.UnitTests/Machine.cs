using UffdGrpc.Mm;

namespace UffdGrpc.UnitTests;

/// <summary>A small test fixture: one simulated machine, one process, one thread, a bump allocator for mappings.</summary>
internal sealed class Machine
{
    private ulong _next = 0x7e00_0000_0000;

    public Machine(KernelProfile profile = KernelProfile.V6_18, MachineConfig? config = null)
    {
        K = new Kernel(profile, config);
        Mm = K.CreateMm();
        T = K.CreateThread(Mm);
    }

    public Kernel K { get; }
    public Mm.Mm Mm { get; }
    public SimThread T { get; }

    public const ulong Pg = Kernel.PageSize;

    /// <summary>Maps <paramref name="pages"/> pages at the next 2 MiB-aligned slot.</summary>
    public ulong Map(ulong pages, Prot prot = Prot.Read | Prot.Write, bool shared = false, MemFile? file = null, bool populate = false)
    {
        var addr = _next;
        _next += (((pages * Pg) + Kernel.PmdSize - 1) & Kernel.PmdMask) + Kernel.PmdSize;
        Assert.Equal(Errno.OK, Mm.Mmap(addr, pages * Pg, prot, shared, file, 0, populate: populate));
        return addr;
    }

    public AccessOp Access(ulong addr, bool write, byte value = 0, int count = 1, SimThread? t = null, AccessOrigin origin = AccessOrigin.User)
    {
        var op = new AccessOp(addr, write, value, count, origin);
        K.Start(t ?? T, op);
        return op;
    }

    public AccessOp Write(ulong addr, byte value, int count = 1, SimThread? t = null) => Access(addr, true, value, count, t);

    public AccessOp Read(ulong addr, int count = 1, SimThread? t = null) => Access(addr, false, 0, count, t);

    public Pte PteAt(ulong addr, Mm.Mm? mm = null) => K.Locked(() => (mm ?? Mm).PageTable.GetPte(addr));

    public ulong Pagemap(ulong addr, Mm.Mm? mm = null) => (mm ?? Mm).PagemapEntry(addr);

    public Page PageAt(ulong addr, Mm.Mm? mm = null) => K.PageOf(Pagemap(addr, mm) & Uapi.PmPfnMask)!;

    public UserfaultfdCtx Uffd(UffdFeatures features = UffdFeatures.None, bool nonBlocking = true)
    {
        Assert.Equal(Errno.OK, K.Userfaultfd(Mm, nonBlocking ? Uapi.ONonblock : 0, out var ctx));
        Assert.Equal(Errno.OK, ctx!.Api(Uapi.UffdApi, (ulong)features, out _, out _));
        return ctx;
    }
}
