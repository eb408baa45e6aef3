using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Recipes.RestoreCommon;

namespace UffdGrpc.Recipes.SnapshotRestore;

/// <summary>Options of one snapshot-restore run.</summary>
public sealed record SnapshotRestoreOptions
{
    public int Pages { get; init; } = 256;
    public int Vcpus { get; init; } = 2;
    public int Seed { get; init; } = 1;
    public SnapshotHandlerKind Handler { get; init; } = SnapshotHandlerKind.Firecracker;
}

/// <summary>A run's check and what its handler did.</summary>
public sealed record SnapshotRestoreReport(SnapshotHandlerKind Handler, PageCheckResult Check, SnapshotHandlerStats Stats, long MachineId);

/// <summary>
/// Firecracker's snapshot restore with a UFFD memory backend, in its roles: the source (the
/// paused VM whose memory went into a snapshot memfd), the restored guest (a fresh address
/// space registered MISSING with EVENT_REMOVE, vCPU threads and a balloon that releases
/// memory with MADV_DONTNEED), and the page-fault handler (<see cref="SnapshotHandler"/>).
/// The check: the guest's memory equals, byte for byte, an eagerly restored copy (the
/// snapshot written in full, no userfaultfd) after the same guest steps.
/// </summary>
public static class SnapshotRestoreRecipe
{
    public const ulong GuestBase = 0x7f10_0000_0000;
    private const int MadvDontneed = 4;
    private const ulong FeatureEventRemove = 0x8;
    private const ulong RegisterMissing = 1;

    /// <summary>Runs every role against <paramref name="client"/>'s server on a machine of its own (destroyed at the end).</summary>
    public static async Task<SnapshotRestoreReport> RunAsync(UffdClient client, SnapshotRestoreOptions o, CancellationToken ct = default)
    {
        var machine = (await client.CreateMachineAsync(ct: ct).ConfigureAwait(false)).MachineId;
        try
        {
            var contents = GuestPattern.Contents(o.Pages, o.Seed);
            var plan = SnapshotPlan.Create(o.Pages, o.Vcpus, GuestBase, o.Seed, p => !contents.AsSpan(p * 4096, 4096).ContainsAnyExcept((byte)0));
            // Source: the snapshot memfd.
            var file = await WriteSnapshotAsync(client, machine, contents, ct).ConfigureAwait(false);
            // Handler: its view of the memfd.
            var snapshot = await ReadSnapshotAsync(client, machine, file, (ulong)contents.Length, ct).ConfigureAwait(false);
            // Guest: restored lazily, and its eager reference.
            var guest = await RestoreGuestAsync(client, machine, o.Pages, o.Vcpus, eagerContents: null, ct).ConfigureAwait(false);
            var reference = await RestoreGuestAsync(client, machine, o.Pages, o.Vcpus, eagerContents: snapshot, ct).ConfigureAwait(false);
            var handler = new SnapshotHandler(client, guest.UffdId, GuestBase, snapshot, o.Handler);
            var stats = await RunGuestAsync(client, guest, plan, handler, ct).ConfigureAwait(false);
            await RunGuestAsync(client, reference, plan, null, ct).ConfigureAwait(false);
            var check = await PageCheck.CompareAsync(client, "guest memory vs the eager restore", guest.MmId, reference.MmId, [(GuestBase, GuestBase + (ulong)contents.Length)], ct).ConfigureAwait(false);
            return new SnapshotRestoreReport(o.Handler, check, stats!, machine);
        }
        finally
        {
            await client.DestroyMachineAsync(machine, CancellationToken.None).ConfigureAwait(false);
        }
    }

    /// <summary>The source role: memfd_create + ftruncate, the paused VM's memory written through a shared mapping; the VM then exits (the memfd stays).</summary>
    public static async Task<long> WriteSnapshotAsync(UffdClient client, long machine, byte[] contents, CancellationToken ct)
    {
        var file = await client.CreateFileAsync(machine, "snapshot", shmem: true, (ulong)contents.Length, ct).ConfigureAwait(false);
        var mm = await client.CreateMmAsync(machine, ct).ConfigureAwait(false);
        (await client.MmapAsync(mm, GuestBase, (ulong)contents.Length, 3, shared: true, fileId: file.FileId, ct: ct).ConfigureAwait(false)).Expect("mmap of the snapshot memfd");
        var t = await client.CreateThreadAsync(mm, ct).ConfigureAwait(false);
        var r = await client.WriteBytesAsync(t.ThreadId, GuestBase, contents, ct: ct).ConfigureAwait(false);
        r.Errno.Expect("writing the snapshot");
        await client.DestroyMmAsync(mm, ct).ConfigureAwait(false);
        return file.FileId;
    }

    /// <summary>The handler role's view of the snapshot: the memfd mapped shared and read-only in the handler's own process.</summary>
    public static async Task<byte[]> ReadSnapshotAsync(UffdClient client, long machine, long fileId, ulong size, CancellationToken ct)
    {
        var mm = await client.CreateMmAsync(machine, ct).ConfigureAwait(false);
        (await client.MmapAsync(mm, GuestBase, size, 1, shared: true, fileId: fileId, readOnlyFd: true, ct: ct).ConfigureAwait(false)).Expect("mmap of the snapshot memfd (handler)");
        var t = await client.CreateThreadAsync(mm, ct).ConfigureAwait(false);
        var r = await client.ReadBytesAsync(t.ThreadId, GuestBase, size, ct: ct).ConfigureAwait(false);
        r.Errno.Expect("reading the snapshot");
        return r.Values.ToByteArray();
    }

    /// <summary>A restored guest: its process, uffd (0 for the eager copy), vCPU threads and balloon thread.</summary>
    public sealed record Guest(long MmId, long UffdId, IReadOnlyList<long> Vcpus, long Balloon);

    /// <summary>
    /// The guest role's restore: guest memory as one private anonymous region. Lazily (no
    /// <paramref name="eagerContents"/>): a userfaultfd with EVENT_REMOVE, the region registered
    /// MISSING, the uffd handed to the handler. Eagerly: <paramref name="eagerContents"/> written in.
    /// </summary>
    public static async Task<Guest> RestoreGuestAsync(UffdClient client, long machine, int pages, int vcpus, byte[]? eagerContents, CancellationToken ct)
    {
        var len = (ulong)pages * 4096;
        var mm = await client.CreateMmAsync(machine, ct).ConfigureAwait(false);
        (await client.MmapAsync(mm, GuestBase, len, 3, ct: ct).ConfigureAwait(false)).Expect("mmap of guest memory");
        var threads = new List<long>();
        for (var i = 0; i <= vcpus; i++)
            threads.Add((await client.CreateThreadAsync(mm, ct).ConfigureAwait(false)).ThreadId);
        long uffd = 0;
        if (eagerContents is null)
        {
            var (e, id) = await client.CreateUffdAsync(mm, ct: ct).ConfigureAwait(false);
            e.Expect("userfaultfd");
            uffd = id;
            (await client.ApiAsync(uffd, FeatureEventRemove, ct: ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_API");
            (await client.RegisterAsync(uffd, GuestBase, len, RegisterMissing, ct).ConfigureAwait(false)).Errno.Expect("UFFDIO_REGISTER");
        }
        else
        {
            (await client.WriteBytesAsync(threads[0], GuestBase, eagerContents, ct: ct).ConfigureAwait(false)).Errno.Expect("eager restore");
        }
        return new Guest(mm, uffd, threads.Take(vcpus).ToList(), threads[vcpus]);
    }

    /// <summary>
    /// The guest's run (<see cref="SnapshotPlan"/>). With a handler: phase A queues its faults
    /// and the balloon's REMOVE before the handler connects, as when Firecracker resumes the
    /// vCPUs before the handler reads the uffd; the handler stops at the end.
    /// </summary>
    public static async Task<SnapshotHandlerStats?> RunGuestAsync(UffdClient client, Guest g, SnapshotPlan plan, SnapshotHandler? handler, CancellationToken ct)
    {
        IGuest guest = new ThreadGuest(client);
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        Task? serving = null;
        try
        {
            var ops = new List<long>();
            for (var v = 0; v < g.Vcpus.Count; v++)
                ops.Add(await guest.StartAsync(g.Vcpus[v], plan.PhaseA[v], ct).ConfigureAwait(false));
            ops.Add((await client.StartOpAsync(g.Balloon, new ThreadOp { Madvise = new MadviseOp { Start = plan.Balloon1.Start, Len = plan.Balloon1.Len, Advice = MadvDontneed } }, ct).ConfigureAwait(false)).OpId);
            if (handler is not null)
                serving = handler.RunAsync(stop.Token);
            for (var i = 0; i < ops.Count; i++)
            {
                var r = await client.WaitOpAsync(ops[i], ct).ConfigureAwait(false);
                if (i < g.Vcpus.Count)
                    ThreadGuest.Completed(plan.PhaseA[i], r);
                else
                    r.Errno.Expect("balloon MADV_DONTNEED");
            }
            await Task.WhenAll(g.Vcpus.Select((t, v) => guest.RunAsync(t, plan.PhaseB[v], ct))).ConfigureAwait(false);
            (await client.MadviseAsync(g.MmId, plan.Balloon2.Start, plan.Balloon2.Len, MadvDontneed, g.Balloon, ct).ConfigureAwait(false)).Expect("balloon MADV_DONTNEED");
            await Task.WhenAll(g.Vcpus.Select((t, v) => guest.RunAsync(t, plan.PhaseC[v], ct))).ConfigureAwait(false);
        }
        finally
        {
            await stop.CancelAsync().ConfigureAwait(false);
            if (serving is not null)
                await serving.ConfigureAwait(false);
        }
        return handler?.Stats;
    }
}
