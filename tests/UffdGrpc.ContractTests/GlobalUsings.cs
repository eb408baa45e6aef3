// The vocabulary every contract test uses: the client SDK, the wire types and the sandbox helpers.
global using Grpc.Core;
global using UffdGrpc.Client;
global using UffdGrpc.Contracts.V1;
global using UffdGrpc.ContractTests.Infrastructure;
global using static UffdGrpc.ContractTests.Infrastructure.ProcessTools;
global using static UffdGrpc.ContractTests.Infrastructure.Sandbox;
global using ThreadState = UffdGrpc.Contracts.V1.ThreadState;
