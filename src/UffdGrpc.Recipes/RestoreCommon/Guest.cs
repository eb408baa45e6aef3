using System.Buffers.Binary;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes.RestoreCommon;

/// <summary>One guest step on a page: read one byte of it, or write its pattern with a generation.</summary>
public readonly record struct GuestTouch(ulong Page, bool Write, uint Generation);

/// <summary>
/// How the restore recipes drive a guest: a thread of a process runs a list of touches in
/// order, each one possibly asleep in a userfault until a handler resolves it. This is the
/// one place that decides how a guest runs (simulated thread accesses today; the
/// WorkloadService once it exists), so the recipes and their eager references share it.
/// </summary>
public interface IGuest
{
    /// <summary>Runs <paramref name="touches"/> on <paramref name="threadId"/>, in order, and returns when the last one completed.</summary>
    Task RunAsync(long threadId, IReadOnlyList<GuestTouch> touches, CancellationToken ct);

    /// <summary>Starts one touch without waiting (the thread may fall asleep in a userfault); returns the operation id.</summary>
    Task<long> StartAsync(long threadId, GuestTouch touch, CancellationToken ct);
}

/// <summary>An <see cref="IGuest"/> on the thread RPCs: a write is a span write of <see cref="GuestPattern"/>, a read a one-byte touch.</summary>
public sealed class ThreadGuest(UffdClient client) : IGuest
{
    public async Task RunAsync(long threadId, IReadOnlyList<GuestTouch> touches, CancellationToken ct)
    {
        foreach (var t in touches)
        {
            var r = await client.AccessAsync(threadId, Op(t), ct).ConfigureAwait(false);
            Completed(t, r);
        }
    }

    public async Task<long> StartAsync(long threadId, GuestTouch touch, CancellationToken ct) =>
        (await client.StartOpAsync(threadId, new ThreadOp { Access = Op(touch) }, ct).ConfigureAwait(false)).OpId;

    private static AccessOp Op(GuestTouch t) => t.Write
        ? new AccessOp { Addr = t.Page, Write = true, Span = new ByteSpan { Data = Google.Protobuf.ByteString.CopyFrom(GuestPattern.Stamp(t.Page, t.Generation)) } }
        : UffdClient.Touch(t.Page, write: false);

    /// <summary>A guest access that ends in a signal or an errno is a recipe failure, not a check result.</summary>
    internal static void Completed(GuestTouch t, ThreadOpResult r)
    {
        if (r.Aborted || r.Signal != SignalCode.Unspecified || !r.Errno.IsOk())
            throw new InvalidOperationException($"guest {(t.Write ? "write" : "read")} at 0x{t.Page:x} ended with {(r.Aborted ? "the thread's exit" : r.Signal != SignalCode.Unspecified ? r.Signal.ToString() : r.Errno.Name())}");
    }
}

/// <summary>
/// The bytes a guest writes: a 64-byte stamp at the start of the page (its address, the
/// generation, and a filler derived from both), so a checker can tell stale from fresh. The
/// rest of the page keeps what was there, so a stale page under a fresh stamp still differs.
/// </summary>
public static class GuestPattern
{
    public const int StampBytes = 64;

    public static byte[] Stamp(ulong page, uint generation)
    {
        var b = new byte[StampBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(b, page);
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(8), generation);
        for (var i = 12; i < b.Length; i++)
            b[i] = (byte)(page >> 12 ^ generation * 31 ^ (uint)i);
        return b;
    }

    /// <summary>Seeded page contents for a snapshot or an image: every <paramref name="zeroEvery"/>-th run of pages all zero (the known-zero pages a restore can skip), the rest a recognisable per-page pattern.</summary>
    public static byte[] Contents(int pages, int seed, int zeroEvery = 4)
    {
        var data = new byte[pages * 4096];
        var rng = new Random(seed);
        for (var p = 0; p < pages; p++)
        {
            if (zeroEvery > 0 && p / 8 % zeroEvery == zeroEvery - 1)
                continue;
            var page = data.AsSpan(p * 4096, 4096);
            rng.NextBytes(page[..32]);
            BinaryPrimitives.WriteInt32LittleEndian(page[32..], p);
            for (var i = 36; i < 4096; i++)
                page[i] = (byte)(p * 7 + i);
        }
        return data;
    }
}
