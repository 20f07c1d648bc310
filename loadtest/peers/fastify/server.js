// GET /v1/me the way a Node.js team would write it: Fastify, jose for the EdDSA access
// token (the same key, issuer and audience checks as mobile-api), and one indexed read
// through a pg pool of the same size. Started by `mobile-loadtest me`; not part of
// the product.
import Fastify from 'fastify';
import { importSPKI, jwtVerify } from 'jose';
import pg from 'pg';

const port = Number(process.env.PORT ?? 3001);
const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: Number(process.env.POOL_SIZE ?? 20) });
const key = await importSPKI(process.env.JWT_PUBLIC_KEY_PEM, 'EdDSA');

const app = Fastify({ logger: false });

app.get('/v1/me', async (request, reply) => {
  const header = request.headers.authorization ?? '';
  const token = header.startsWith('Bearer ') ? header.slice(7) : null;
  if (!token) {
    return reply.code(401).send({ code: 'unauthenticated' });
  }
  let payload;
  try {
    ({ payload } = await jwtVerify(token, key, {
      algorithms: ['EdDSA'],
      issuer: 'mobile-backend',
      audience: 'mobile-app',
    }));
  } catch {
    return reply.code(401).send({ code: 'invalid_token' });
  }
  const { rows } = await pool.query(
    'SELECT id, email, display_name, created_at, updated_at FROM users WHERE id = $1',
    [payload.sub],
  );
  if (rows.length === 0) {
    return reply.code(404).send({ code: 'not_found' });
  }
  return rows[0];
});

app.get('/health/ready', async () => ({ status: 'ready' }));

await app.listen({ port, host: '127.0.0.1' });
