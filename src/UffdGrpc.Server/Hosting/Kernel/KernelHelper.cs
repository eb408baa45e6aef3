using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>The helper's operations (the request frame's op; uffd-helper.c).</summary>
internal enum HelperOp : uint
{
    Mmap = 1,
    Munmap,
    Mprotect,
    Madvise,
    UffdOpen,
    UffdIoctl,
    UffdClose,
    Thread,
    Access,
    Pagemap,
}

/// <summary>The uffd ioctls the helper performs (a[2] of a UffdIoctl request).</summary>
internal enum HelperIoctl : ulong
{
    Api = 1,
    Register,
    Unregister,
    Wake,
    Writeprotect,
    Copy,
    Zeropage,
    Continue,
    Poison,
    Move,
}

/// <summary>A reply frame: the errno (0 for success), six result words and the data.</summary>
internal readonly record struct HelperReply(int Err, ulong[] R, byte[] Data);

/// <summary>The helper is gone (killed with its address space, or crashed): the calls it had not answered end with this.</summary>
internal sealed class HelperGoneException(string message) : Exception(message);

/// <summary>
/// One helper process (uffd-helper.c) and its frame protocol over stdin/stdout: requests are
/// written one at a time; replies are matched to requests by id as they arrive (an access
/// answers when its thread's access ends, so replies come out of order); event frames (a
/// uffd_msg the helper read) go to <see cref="OnEvent"/> in the order the helper read them.
/// The reader awaits frames: nothing polls.
/// </summary>
internal sealed class KernelHelper : IDisposable
{
    private const int RequestHeader = 76; // id, op, pad, a[8]
    private const int ReplyHeader = 60; // id, kind, err, r[6]
    private const int MaxFrame = (64 << 20) + 4096;

    private readonly Process _process;
    private readonly Stream _stdin;
    private readonly Stream _stdout;
    private readonly SemaphoreSlim _writeGate = new(1, 1);
    private readonly ConcurrentDictionary<uint, TaskCompletionSource<HelperReply>> _pending = new();
    private readonly TaskCompletionSource<HelperReply> _hello = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly System.Text.StringBuilder _stderr = new();
    private uint _nextId;
    private volatile string? _gone;
    private volatile bool _killed;
    private int _reaped;

    private KernelHelper(Process process)
    {
        _process = process;
        _stdin = process.StandardInput.BaseStream;
        _stdout = process.StandardOutput.BaseStream;
    }

    /// <summary>Receives each uffd_msg the helper read: the uffd's handle and the 32 bytes of the message.</summary>
    public Action<ulong, byte[]>? OnEvent { get; set; }

    /// <summary>Called once when the helper is gone: true when it was killed on purpose.</summary>
    public Action<bool, string>? OnGone { get; set; }

    public int Pid { get; private set; }

    /// <summary>The lowest address of the helper's own mappings: a kernel-backed address space's ranges stay below it.</summary>
    public ulong OwnLow { get; private set; }

    /// <summary>Why the helper is gone, or null while it serves.</summary>
    public string? Gone => _gone;

    public static async Task<KernelHelper> StartAsync(string binary, CancellationToken ct)
    {
        var psi = new ProcessStartInfo(binary)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start " + binary);
        var h = new KernelHelper(p);
        p.ErrorDataReceived += (_, e) =>
        {
            lock (h._stderr)
            {
                if (e.Data is { } line && h._stderr.Length < 4096)
                    h._stderr.AppendLine(line);
            }
        };
        p.BeginErrorReadLine();
        _ = Task.Run(h.ReadLoopAsync, CancellationToken.None);
        try
        {
            var hello = await h._hello.Task.WaitAsync(TimeSpan.FromSeconds(30), ct).ConfigureAwait(false);
            h.OwnLow = hello.R[0];
            h.Pid = (int)hello.R[1];
            return h;
        }
        catch
        {
            h.Kill();
            throw;
        }
    }

    /// <summary>Sends one request; the task completes with its reply, or fails with <see cref="HelperGoneException"/> if the helper goes first.</summary>
    public async Task<HelperReply> CallAsync(HelperOp op, ulong[] args, ReadOnlyMemory<byte> data = default)
    {
        if (_gone is { } why)
            throw new HelperGoneException(why);
        var id = Interlocked.Increment(ref _nextId);
        var tcs = new TaskCompletionSource<HelperReply>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[id] = tcs;
        var frame = new byte[4 + RequestHeader + data.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(frame, (uint)(RequestHeader + data.Length));
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(4), id);
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(8), (uint)op);
        for (var i = 0; i < args.Length && i < 8; i++)
            BinaryPrimitives.WriteUInt64LittleEndian(frame.AsSpan(16 + (8 * i)), args[i]);
        data.Span.CopyTo(frame.AsSpan(4 + RequestHeader));
        try
        {
            await _writeGate.WaitAsync().ConfigureAwait(false);
        }
        catch (ObjectDisposedException)
        {
            _pending.TryRemove(id, out _);
            throw new HelperGoneException(_gone ?? "the kernel helper is gone");
        }
        try
        {
            await _stdin.WriteAsync(frame).ConfigureAwait(false);
            await _stdin.FlushAsync().ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is IOException or ObjectDisposedException)
        {
            // The helper is gone: the reader fails every pending call, this one too.
        }
        finally
        {
            _writeGate.Release();
        }
        if (_gone is not null)
            Fail();
        return await tcs.Task.ConfigureAwait(false);
    }

    private async Task ReadLoopAsync()
    {
        var len = new byte[4];
        try
        {
            while (true)
            {
                await _stdout.ReadExactlyAsync(len).ConfigureAwait(false);
                var n = BinaryPrimitives.ReadInt32LittleEndian(len);
                if (n < ReplyHeader || n > MaxFrame)
                    throw new InvalidDataException($"bad frame length {n}");
                var body = new byte[n];
                await _stdout.ReadExactlyAsync(body).ConfigureAwait(false);
                var id = BinaryPrimitives.ReadUInt32LittleEndian(body);
                var kind = BinaryPrimitives.ReadUInt32LittleEndian(body.AsSpan(4));
                var r = new ulong[6];
                for (var i = 0; i < 6; i++)
                    r[i] = BinaryPrimitives.ReadUInt64LittleEndian(body.AsSpan(12 + (8 * i)));
                var reply = new HelperReply(BinaryPrimitives.ReadInt32LittleEndian(body.AsSpan(8)), r, body[ReplyHeader..]);
                if (kind == 2)
                    OnEvent?.Invoke(r[0], reply.Data);
                else if (id == 0)
                    _hello.TrySetResult(reply);
                else if (_pending.TryRemove(id, out var tcs))
                    tcs.TrySetResult(reply);
            }
        }
        catch (Exception ex) when (ex is EndOfStreamException or IOException or InvalidDataException or ObjectDisposedException)
        {
            string why;
            if (_killed)
            {
                why = "the address space was destroyed";
            }
            else
            {
                await _process.WaitForExitAsync().ConfigureAwait(false);
                lock (_stderr)
                    why = $"the kernel helper (pid {Pid}) exited with status {_process.ExitCode}{(ex is InvalidDataException ? ": " + ex.Message : "")}{(_stderr.Length > 0 ? ": " + _stderr.ToString().Trim() : "")}";
            }
            _gone = why;
            // The address space learns first (broken, or destroyed), so the failed calls report it.
            OnGone?.Invoke(_killed, why);
            _hello.TrySetException(new HelperGoneException(why));
            Fail();
        }
    }

    private void Fail()
    {
        foreach (var id in _pending.Keys)
        {
            if (_pending.TryRemove(id, out var tcs))
                tcs.TrySetException(new HelperGoneException(_gone ?? "the kernel helper is gone"));
        }
    }

    /// <summary>SIGKILL to the helper (its threads asleep in userfaults die with it) and reaps it.</summary>
    public void Kill()
    {
        if (Interlocked.Exchange(ref _reaped, 1) != 0)
            return;
        _killed = true;
        try
        {
            _process.Kill(entireProcessTree: true);
        }
        catch (InvalidOperationException)
        {
            // Already exited.
        }
        _process.WaitForExit(10_000);
        _process.Dispose();
    }

    /// <summary>As <see cref="Kill"/>.</summary>
    public void Dispose()
    {
        Kill();
        _writeGate.Dispose();
    }
}
