using UffdGrpc.Mm;

namespace UffdGrpc.Benchmarks;

/// <summary>A machine with one process, one thread and a populated private anonymous range of 4 KiB pages (THPs off for it).</summary>
public sealed class PopulatedRange
{
    public const ulong A = 0x7e00_0000_0000;
    public const ulong Pg = Kernel.PageSize;

    public PopulatedRange(ulong pages, UffdFeatures features = UffdFeatures.None, bool registerWp = false)
    {
        K = new Kernel(KernelProfile.V6_18, new MachineConfig { MemoryBytes = 8UL << 30 });
        Mm = K.CreateMm();
        T = K.CreateThread(Mm);
        Pages = pages;
        Len = pages * Pg;
        Check(Mm.Mmap(A, Len, Prot.Read | Prot.Write, false, null, 0));
        Run(MadviseOp.Create(A, Len, Madv.Nohugepage));
        Run(MadviseOp.Create(A, Len, Madv.PopulateWrite));
        Vma = Mm.VmaLookup(A)!;
        if (registerWp)
        {
            Check(K.Userfaultfd(Mm, Uapi.ONonblock, out var ctx));
            Check(ctx!.Api(Uapi.UffdApi, (ulong)features, out _, out _));
            Check(ctx.Register(A, Len, Uapi.RegisterModeWp, out _));
            Ctx = ctx;
        }
    }

    public Kernel K { get; }
    public Mm.Mm Mm { get; }
    public SimThread T { get; }
    public Vma Vma { get; }
    public UserfaultfdCtx? Ctx { get; }
    public ulong Pages { get; }
    public ulong Len { get; }

    public void Run(SyscallOp op)
    {
        K.Start(T, op);
        if (!op.IsCompleted)
            throw new InvalidOperationException($"{op.GetType().Name} did not complete");
    }

    public static void Check(Errno e)
    {
        if (e != Errno.OK)
            throw new InvalidOperationException(e.ToString());
    }
}
