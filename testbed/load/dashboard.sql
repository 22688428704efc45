-- A dashboard refresh: the demo's views.
SELECT day, region, orders, revenue FROM daily_sales_by_region WHERE day > current_date - 7 ORDER BY day, region;
SELECT product_id, name, revenue FROM top_products ORDER BY revenue DESC LIMIT 10;
SELECT region, count(*) FROM active_customers GROUP BY region;
