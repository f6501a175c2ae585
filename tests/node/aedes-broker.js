// A second MQTT broker implementation (aedes, in-memory persistence) for tests/other_broker.rs:
// node aedes-broker.js PORT  -- listens on 127.0.0.1:PORT, prints "listening" when ready.
const aedes = require('aedes')();
const server = require('net').createServer(aedes.handle);
server.listen(parseInt(process.argv[2], 10), '127.0.0.1', () => console.log('listening'));
