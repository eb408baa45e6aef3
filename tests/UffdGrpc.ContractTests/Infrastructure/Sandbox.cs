using Google.Rpc;

namespace UffdGrpc.ContractTests.Infrastructure;

/// <summary>A fresh machine with one process, a thread and (optionally) a WP-registered anon mapping with a uffd.</summary>
public sealed class Sandbox : IAsyncDisposable
{
    public const ulong A = 0x7e00_0000_0000;
    public const ulong B = 0x7e00_0040_0000;
    public const ulong Page = 4096;

    private Sandbox(UffdClient client) => Client = client;

    public UffdClient Client { get; }
    public long Machine { get; private set; }
    public long Mm { get; private set; }
    public long Thread { get; private set; }
    public int Tid { get; private set; }
    public long Uffd { get; private set; }

    public static async Task<Sandbox> CreateAsync(UffdClient client, ulong pages = 0, ulong registerMode = 0, ulong features = 0)
    {
        var s = new Sandbox(client);
        s.Machine = (await client.CreateMachineAsync()).MachineId;
        s.Mm = await client.CreateMmAsync(s.Machine);
        var t = await client.CreateThreadAsync(s.Mm);
        s.Thread = t.ThreadId;
        s.Tid = t.Tid;
        if (pages > 0)
        {
            Assert.Equal(Errno.Unspecified, await client.MmapAsync(s.Mm, A, pages * Page, 3));
            if (registerMode != 0)
            {
                var (e, uffd) = await client.CreateUffdAsync(s.Mm);
                Assert.Equal(Errno.Unspecified, e);
                s.Uffd = uffd;
                Assert.Equal(Errno.Unspecified, (await client.ApiAsync(uffd, features)).Errno);
                Assert.Equal(Errno.Unspecified, (await client.RegisterAsync(uffd, A, pages * Page, registerMode)).Errno);
            }
        }
        return s;
    }

    public async Task<ThreadInfo> NewThreadAsync() => await Client.CreateThreadAsync(Mm);

    /// <summary>Waits (bounded) until <paramref name="condition"/> holds; the server state it polls is model state, not timing.</summary>
    public static async Task EventuallyAsync(Func<Task<bool>> condition, string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (!await condition())
        {
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException("timed out waiting until " + what);
            await Task.Delay(5);
        }
    }

    /// <summary>The google.rpc.ErrorInfo of a rejected request (null when the status carries none).</summary>
    public static ErrorInfo? ErrorInfoOf(RpcException ex) => ex.GetRpcStatus()?.GetDetail<ErrorInfo>();

    /// <summary>The field the server's google.rpc.BadRequest names first (null when there is none).</summary>
    public static string? BadFieldOf(RpcException ex) => ex.GetRpcStatus()?.GetDetail<BadRequest>()?.FieldViolations.FirstOrDefault()?.Field;

    /// <summary>Runs a unary call and asserts it answered OK: a kernel errno travels in the response, never in the status.</summary>
    public static async Task<T> OkAsync<T>(AsyncUnaryCall<T> call)
    {
        using (call)
        {
            var r = await call.ResponseAsync;
            Assert.Equal(StatusCode.OK, call.GetStatus().StatusCode);
            return r;
        }
    }

    public async ValueTask DisposeAsync() => await Client.DestroyMachineAsync(Machine);
}
