using System.Buffers.Binary;
using System.Security.Cryptography;

namespace UffdGrpc.Mm;

/// <summary>
/// One digest of a machine's whole observable state, for deterministic replay: two runs of
/// the same calls under the same seeds end with the same digest, byte for byte.
/// </summary>
public sealed partial class Kernel
{
    /// <summary>
    /// SHA-256 over every process in creation order: its id, whether it exited, its threads
    /// (tid, state), its VMAs (range, flags, offset, registration) and, page by page, the raw
    /// PTE or huge PMD and the SHA-256 of what a read would find (as <see cref="Mm.Digest"/>);
    /// then each userfaultfd context's unread and blocked counts. Ranges without a page table
    /// and with nothing behind them count once, as a run. Nothing changes.
    /// </summary>
    public byte[] StateDigest()
    {
        using var _ = Enter();
        using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var ctxs = new List<UserfaultfdCtx>();
        foreach (var mm in _mms)
        {
            mm.AppendStateDigest(h, ctxs);
        }
        foreach (var c in ctxs)
        {
            StateDigestAppend(h, (ulong)c.UnreadCount, (ulong)c.BlockedFaults, c.Released ? 1UL : 0);
        }
        return h.GetHashAndReset();
    }

    /// <summary>Appends 64-bit little-endian values to the digest.</summary>
    internal static void StateDigestAppend(IncrementalHash h, params ReadOnlySpan<ulong> values)
    {
        Span<byte> b = stackalloc byte[8];
        foreach (var v in values)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(b, v);
            h.AppendData(b);
        }
    }
}

public sealed partial class Mm
{
    /// <summary>This process's part of <see cref="Kernel.StateDigest"/>; its uffd contexts are added to <paramref name="ctxs"/> (first seen first).</summary>
    internal void AppendStateDigest(IncrementalHash h, List<UserfaultfdCtx> ctxs)
    {
        Kernel.StateDigestAppend(h, (ulong)Id, Exited ? 1UL : 0, (ulong)Threads.Count);
        foreach (var t in Threads)
            Kernel.StateDigestAppend(h, (ulong)t.Tid, (ulong)t.State);
        Span<byte> hash = stackalloc byte[DigestSize];
        foreach (var vma in _vmas)
        {
            Kernel.StateDigestAppend(h, vma.Start, vma.End, (ulong)vma.Flags, vma.PgOff, vma.File is null ? 0UL : 1, vma.UffdCtx is null ? 0UL : 1);
            if (vma.UffdCtx is { } c && !ctxs.Contains(c))
                ctxs.Add(c);
            foreach (var st in PageTable.Walk(vma.Start, vma.End))
            {
                var table = st.PteTable;
                if (!st.IsHuge && table is null && NoPteRangeIsEmpty(vma, st.Addr, st.End))
                {
                    Kernel.StateDigestAppend(h, st.Addr, st.End);
                    continue;
                }
                for (var a = st.Addr; a < st.End; a += Kernel.PageSize)
                {
                    PageContentState state;
                    ReadOnlyMemory<byte> data;
                    ulong raw;
                    if (st.IsHuge)
                    {
                        var pmd = st.Table!.Entries[st.Index];
                        raw = pmd.Value;
                        state = ObserveHuge(pmd, a, out data);
                    }
                    else
                    {
                        var pte = table?.Entries[PageTable.PteIndex(a)] ?? Pte.None;
                        raw = pte.Value;
                        state = ObservePte(vma, pte, a, out data);
                    }
                    Hash(state, data, hash);
                    Kernel.StateDigestAppend(h, a, raw, (ulong)state);
                    h.AppendData(hash);
                }
            }
        }
    }
}
