namespace UffdGrpc.Testing.Tests;

// The README's example test, verbatim: a user's handler under test against the in-process server.
public class MyHandlerTests(UffdServerFixture server) : IClassFixture<UffdServerFixture>
{
    [Fact]
    public async Task My_handler_fills_a_missing_page()
    {
        var c = server.Client;
        var mm = await c.CreateMmAsync((await c.CreateMachineAsync()).MachineId);
        var thread = (await c.CreateThreadAsync(mm)).ThreadId;
        await c.MmapAsync(mm, 0x7e0000000000, 4096, prot: 3);
        var (_, uffd) = await c.CreateUffdAsync(mm);
        await c.ApiAsync(uffd);
        await c.RegisterAsync(uffd, 0x7e0000000000, 4096, mode: 1);   // UFFDIO_REGISTER_MODE_MISSING
        var read = c.ReadAsync(thread, 0x7e0000000000);               // sleeps in handle_userfault
        await foreach (var msg in c.ReadEventsAsync(uffd))            // the handler under test
        {
            await c.CopyFillAsync(uffd, msg.Pagefault.Address, 0x7f0000000000, 0x5a, 4096);
            break;
        }
        Assert.Equal(0x5a, (await read).Values[0]);
    }
}
