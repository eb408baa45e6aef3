using UffdGrpc.Server;
using UffdGrpc.Server.Hosting;

var builder = WebApplication.CreateBuilder(ServerStartup.Options(args));
builder.Services.AddUffdServer();

var app = builder.Build();
app.MapUffdServices();
// Graceful shutdown (SIGTERM): streams, pending accesses and waits end with UNAVAILABLE at
// once, so Kestrel's drain finishes well inside the host's shutdown timeout.
var registry = app.Services.GetRequiredService<MachineRegistry>();
// Persistence (off unless Persistence:Directory is set): load at start, save on shutdown,
// after every waiter has been ended so nothing changes while it is written.
var persistence = app.Services.GetRequiredService<MachinePersistence>();
persistence.LoadAll();
var auth = app.Services.GetRequiredService<Microsoft.Extensions.Options.IOptions<UffdGrpc.Server.Security.AuthOptions>>().Value;
var startupLog = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("UffdGrpc.Server");
Log.AuthMode(startupLog, auth.Anonymous, auth.Tokens.Count);
if (auth.Anonymous == UffdGrpc.Server.Security.AnonymousAccess.Allow)
    Log.AnonymousFromAnywhere(startupLog);
app.Lifetime.ApplicationStopping.Register(() =>
{
    registry.Shutdown();
    persistence.SaveAll();
});
app.Run();

/// <summary>The server's entry point (public for WebApplicationFactory).</summary>
public partial class Program;
