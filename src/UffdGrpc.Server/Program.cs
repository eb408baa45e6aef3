using UffdGrpc.Server;
using UffdGrpc.Server.Services;

var builder = WebApplication.CreateBuilder(ServerStartup.Options(args));
builder.Services.AddUffdServer();

var app = builder.Build();
app.MapGrpcService<MachinesService>();
app.MapGrpcService<MmService>();
app.MapGrpcService<ThreadsService>();
app.MapGrpcService<UserfaultfdService>();
app.MapGrpcHealthChecksService();
app.MapGrpcReflectionService();
app.Run();

/// <summary>The server's entry point (public for WebApplicationFactory).</summary>
public partial class Program;
