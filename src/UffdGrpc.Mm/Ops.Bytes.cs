namespace UffdGrpc.Mm;

/// <summary>
/// A read or write of <see cref="Length"/> bytes at any address: a user access (the
/// thread's own loads/stores, e.g. memcpy) or a kernel-origin access (copy_to_user /
/// copy_from_user on behalf of a syscall). The CPU touches the range page by page in
/// address order; each page faults for the access type exactly as <see cref="AccessOp"/>
/// does (<see cref="Mm.AccessPage"/>) and then its bytes are copied. A userfault parks the
/// thread; when woken the access resumes at the page it was on (completed pages are not
/// redone). The access stops at the first page that raises a signal: <see cref="Done"/>
/// counts the bytes before it, a user access reports <see cref="Signal"/>, a kernel access
/// EFAULT in <see cref="SyscallOp.Result"/>.
/// </summary>
/// <remarks>
/// Models raw_copy_to_user / raw_copy_from_user (arch/x86/lib/copy_user_64.S with its
/// exception fixup) and a user-mode copy loop: the bytes of a page are copied only once
/// its fault has been handled, so a fault leaves a page-granular prefix done. A kernel
/// access first checks the whole range with access_ok (arch/x86/include/asm/uaccess_64.h).
/// The op holds one buffer of <see cref="Length"/> bytes (the input of a write, the output
/// of a read) and allocates nothing per page.
/// </remarks>
public sealed class BytesAccessOp : SyscallOp
{
    private readonly ReadOnlyMemory<byte> _input;
    private readonly byte[]? _output;

    private BytesAccessOp(ulong addr, int length, bool write, ReadOnlyMemory<byte> input, AccessOrigin origin)
    {
        Addr = addr;
        Length = length;
        IsWrite = write;
        Origin = origin;
        _input = input;
        _output = write ? null : new byte[length];
    }

    /// <summary>A read of <paramref name="length"/> bytes at <paramref name="addr"/>.</summary>
    public static BytesAccessOp Read(ulong addr, int length, AccessOrigin origin = AccessOrigin.User)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        return new BytesAccessOp(addr, length, write: false, default, origin);
    }

    /// <summary>A write of <paramref name="data"/> at <paramref name="addr"/>; the op keeps (does not copy) <paramref name="data"/>, which must not change until it completes.</summary>
    public static BytesAccessOp Write(ulong addr, ReadOnlyMemory<byte> data, AccessOrigin origin = AccessOrigin.User) =>
        new(addr, data.Length, write: true, data, origin);

    /// <summary>The first byte accessed (any alignment).</summary>
    public ulong Addr { get; }
    /// <summary>The number of bytes to access.</summary>
    public int Length { get; }
    /// <summary>The access stores bytes (otherwise it loads them).</summary>
    public bool IsWrite { get; }
    /// <summary>A user access (signals) or a kernel copy (EFAULT).</summary>
    public AccessOrigin Origin { get; }
    /// <summary>Bytes completed so far (a whole number of pages' worth, except for the range's edges).</summary>
    public int Done { get; private set; }
    /// <summary>The signal that ended a user access, or None.</summary>
    public SigCode Signal { get; private set; }
    /// <summary>For a read, the bytes read so far (the completed prefix); empty for a write.</summary>
    public ReadOnlyMemory<byte> Data => _output is null ? ReadOnlyMemory<byte>.Empty : _output.AsMemory(0, Done);

    protected internal override bool Step()
    {
        if (Done == 0 && Origin == AccessOrigin.Kernel && !AccessOk(Addr, (ulong)Length))
        {
            Result = Errno.EFAULT;
            return true;
        }
        while (Done < Length)
        {
            var a = Addr + (ulong)Done;
            if (a < Addr)
                return Fail(FaultResult.SigSegvMaperr);
            var n = (int)Math.Min((ulong)(Length - Done), Kernel.PageSize - (a & (Kernel.PageSize - 1)));
            var r = IsWrite
                ? Mm.AccessPage(Thread, a, true, Origin, _input.Span.Slice(Done, n), default)
                : Mm.AccessPage(Thread, a, false, Origin, default, _output.AsSpan(Done, n));
            switch (r)
            {
                case FaultResult.Ok:
                    Done += n;
                    continue;
                case FaultResult.Blocked:
                    return false;
                default:
                    return Fail(r);
            }
        }
        return true;
    }

    private bool Fail(FaultResult r)
    {
        if (Origin == AccessOrigin.Kernel)
            Result = Errno.EFAULT;
        else
            Signal = Mm.SignalOf(r);
        return true;
    }

    /// <summary>Models access_ok (x86-64): the range must not wrap and must end at or below TASK_SIZE_MAX.</summary>
    private static bool AccessOk(ulong addr, ulong len)
    {
        var end = addr + len;
        return end >= addr && end <= Kernel.TaskSize;
    }
}
